r"""Logic of experiments/generate.py (importable without its flags): train a tiny byte-level LM
and sample, or sample a finished length-extrapolation run.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

import sbjax.data
import sbjax.models
import sbjax.training


def default_text() -> str:
  return " ".join(str(i) for i in range(5000))


def train_and_sample(text: str, prompts: list[str], *, attention="stickbreaking", train_steps=300,
                     seq_len=64, batch=16, max_new_tokens=32, temperature=0.7, top_k=None,
                     seed=0, workdir=None, progress_bar=True, **lm_overrides):
  """Trains a tiny byte-level LM on ``text`` and returns ``[(prompt, continuation, mean log-prob
  per byte)]``, one sample per prompt. ``lm_overrides`` replace fields of the "tiny" LMConfig."""
  data = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
  if not prompts or not all(prompts):
    raise ValueError(f"prompts must be non-empty strings, got {prompts=}.")
  if data.size < seq_len + 2:
    raise ValueError(f"text must be longer than seq_len + 1 = {seq_len + 1} bytes, got {data.size}.")

  def batches(step):  # a pure function of (step, seed): resumes exactly
    starts = np.random.default_rng([seed, step]).integers(0, data.size - seq_len - 1, batch)
    windows = np.stack([data[s:s + seq_len + 1] for s in starts])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

  config = sbjax.models.lm_config("tiny", attention=attention, **lm_overrides)
  # RBG keys: threefry's initialisers take seconds to compile on a CPU.
  model = sbjax.models.DecoderLM(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")))
  sbjax.training.train(
      model, sbjax.training.TrainConfig(
          num_steps=train_steps, learning_rate=3e-3, warmup_steps=min(20, train_steps),
          log_every=max(train_steps // 4, 1), eval_every=0, checkpoint_every=train_steps,
          progress_bar=progress_bar),
      batches, workdir)
  encoded = [np.frombuffer(p.encode(), np.uint8).astype(np.int32) for p in prompts]
  decode = lambda ids: bytes(np.asarray(ids, np.uint8)).decode("utf-8", errors="replace")
  return _sample(model, encoded, decode, max_new_tokens, temperature, top_k, seed, eos_id=None,
                 prompts=prompts)


def _sample(model, encoded, decode, max_new_tokens, temperature, top_k, seed, eos_id, prompts):
  """All prompts in one batch, right-padded, each continuing from its own length."""
  lengths = np.asarray([len(e) for e in encoded])
  tokens = np.zeros((len(encoded), lengths.max()), np.int32)  # [B, P]
  for row, e in enumerate(encoded):
    tokens[row, :len(e)] = e
  out, log_probs = sbjax.models.generate(
      model, tokens, max_new_tokens, rng=jax.random.key(seed), temperature=temperature,
      top_k=top_k, eos_id=eos_id, prompt_lengths=lengths)
  samples = []
  for prompt, row, lp in zip(prompts, np.asarray(out), np.asarray(log_probs)):
    n = len(row) if eos_id is None or eos_id not in row else list(row).index(eos_id)
    samples.append((prompt, decode(row[:n]), float(np.mean(lp[:max(n, 1)]))))
  return samples


def run_spec(run_dir: str) -> dict:
  """The ``run.json`` of the length-extrapolation run in ``run_dir`` (attention, seed, model and
  train configs)."""
  spec_path = os.path.join(run_dir, "run.json")
  if not os.path.exists(spec_path):
    raise ValueError(f"run_dir must hold a length-extrapolation run (run.json), got {run_dir!r}.")
  with open(spec_path) as f:
    return json.load(f)


def run_tokenizer(run_dir: str, tokenizer=None) -> sbjax.data.Tokenizer:
  """The BPE tokenizer of the run in ``run_dir`` (``tokenizer``: another tokenizer file)."""
  return sbjax.data.Tokenizer(
      tokenizer or os.path.join(run_dir, os.pardir, os.pardir, "tokenizer.json"))


def load_run(run_dir: str, *, tokenizer=None, **model_overrides):
  """``(model, tokenizer)`` of the finished length-extrapolation run in ``run_dir``: its model
  (``LMConfig`` fields in ``model_overrides`` replaced, e.g. ``implementation``) with the last
  checkpoint's weights, and its BPE tokenizer."""
  spec = run_spec(run_dir)
  tokenizer = run_tokenizer(run_dir, tokenizer)
  model_config = sbjax.models.LMConfig(**dict(spec["model"], **model_overrides))
  train_config = sbjax.training.TrainConfig(
      **dict(spec["train"], mesh_shape=tuple(spec["train"]["mesh_shape"]), progress_bar=False))
  model = sbjax.models.DecoderLM(model_config, rngs=nnx.Rngs(spec["seed"]))

  def no_batches(step):
    raise ValueError(f"run_dir {run_dir!r} is not trained to step {train_config.num_steps} "
                     f"(needed a batch for step {step}); train it with length_extrapolation.py.")

  # A finished workdir restores its last checkpoint into the model and trains nothing.
  sbjax.training.train(model, train_config, no_batches, run_dir)
  return model, tokenizer


def sample_run(run_dir: str, prompts: list[str], *, tokenizer=None, max_new_tokens=32,
               temperature=0.7, top_k=None, seed=0):
  """``[(prompt, continuation, mean log-prob per token)]`` from the finished length-extrapolation
  run in ``run_dir`` (its model, last checkpoint and BPE tokenizer; generation stops at the
  end-of-text token)."""
  if not prompts or not all(prompts):
    raise ValueError(f"prompts must be non-empty strings, got {prompts=}.")
  model, tokenizer = load_run(run_dir, tokenizer=tokenizer)
  return _sample(model, [tokenizer.encode(p) for p in prompts], tokenizer.decode, max_new_tokens,
                 temperature, top_k, seed, eos_id=tokenizer.eot_id, prompts=prompts)
