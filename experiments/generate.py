r"""Text generation with a stick-breaking LM: sample from a length-extrapolation run, or train a
tiny byte-level DecoderLM and sample from it.

With ``--run_dir`` (a finished run of experiments/length_extrapolation.py,
``<workdir>/runs/<name>``: its ``run.json`` gives the model, its checkpoints the weights,
``<workdir>/tokenizer.json`` the BPE tokenizer) the prompts are continued by that model until
``--max_new_tokens`` or the end-of-text token. Otherwise:

Trains ``sbjax.models.lm_config("tiny")`` (bytes as tokens, V=256) for ``--train_steps`` on a
text (``--text_file``, or by default the numbers 0..4999 written out, which a tiny model learns to
continue in a few hundred CPU steps), then samples continuations of ``--prompts`` with
``sbjax.models.generate`` (KV caches, one prefill, one compiled loop of decode steps). With
``--workdir`` the run is checkpointed there and a finished workdir is sampled from without
training again. The prompts are one right-padded batch (``prompt_lengths``); a progress bar
follows training.

  python experiments/generate.py
  python experiments/generate.py --attention=softmax_rope --temperature=0 --max_new_tokens=48
  python experiments/generate.py --workdir=/tmp/sb_tiny --train_steps=600 --prompts="41 42 ,99"
  python experiments/generate.py --run_dir=workdir_le/runs/stickbreaking-seed0-7b34924b2c \
      --prompts="It was a dark and stormy night" --max_new_tokens=200
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import numpy as np
from flax import nnx

import sbjax.data
import sbjax.models
import sbjax.training

import logs

_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 text to train on (default: numbers).")
_ATTENTION = flags.DEFINE_enum("attention", "stickbreaking", ["stickbreaking", "softmax_rope",
                                                              "softmax_nope"], "Attention.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 300, "Optimiser steps.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Training window in bytes.")
_BATCH = flags.DEFINE_integer("batch", 16, "Training batch.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints (resumed; sampled if finished).")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "A finished length-extrapolation run to sample.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Its tokenizer (default: <run_dir>/../../"
                                 "tokenizer.json, where the experiment writes it).")
_PROMPTS = flags.DEFINE_list("prompts", ["10 11 12 ", "997 998 "], "Prompts, comma-separated.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Bytes sampled per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely bytes.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation, data order and sampling seed.")


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


def sample_run(run_dir: str, prompts: list[str], *, tokenizer=None, max_new_tokens=32,
               temperature=0.7, top_k=None, seed=0):
  """``[(prompt, continuation, mean log-prob per token)]`` from the finished length-extrapolation
  run in ``run_dir`` (its model, last checkpoint and BPE tokenizer; generation stops at the
  end-of-text token)."""
  if not prompts or not all(prompts):
    raise ValueError(f"prompts must be non-empty strings, got {prompts=}.")
  spec_path = os.path.join(run_dir, "run.json")
  if not os.path.exists(spec_path):
    raise ValueError(f"run_dir must hold a length-extrapolation run (run.json), got {run_dir!r}.")
  with open(spec_path) as f:
    spec = json.load(f)
  tokenizer = sbjax.data.Tokenizer(
      tokenizer or os.path.join(run_dir, os.pardir, os.pardir, "tokenizer.json"))
  model_config = sbjax.models.LMConfig(**spec["model"])
  train_config = sbjax.training.TrainConfig(
      **dict(spec["train"], mesh_shape=tuple(spec["train"]["mesh_shape"]), progress_bar=False))
  model = sbjax.models.DecoderLM(model_config, rngs=nnx.Rngs(spec["seed"]))

  def no_batches(step):
    raise ValueError(f"run_dir {run_dir!r} is not trained to step {train_config.num_steps} "
                     f"(needed a batch for step {step}); train it with length_extrapolation.py.")

  # A finished workdir restores its last checkpoint into the model and trains nothing.
  sbjax.training.train(model, train_config, no_batches, run_dir)
  return _sample(model, [tokenizer.encode(p) for p in prompts], tokenizer.decode, max_new_tokens,
                 temperature, top_k, seed, eos_id=tokenizer.eot_id, prompts=prompts)


def main(argv):
  del argv
  logs.install()
  sampling = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                  top_k=_TOP_K.value, seed=_SEED.value)
  if _RUN_DIR.value:
    samples = sample_run(_RUN_DIR.value, _PROMPTS.value, tokenizer=_TOKENIZER.value, **sampling)
    unit = "token"
  else:
    text = default_text()
    if _TEXT_FILE.value:
      with open(_TEXT_FILE.value, encoding="utf-8") as f:
        text = f.read()
    samples = train_and_sample(
        text, _PROMPTS.value, attention=_ATTENTION.value, train_steps=_TRAIN_STEPS.value,
        seq_len=_SEQ_LEN.value, batch=_BATCH.value, workdir=_WORKDIR.value, **sampling)
    unit = "byte"
  for prompt, continuation, mean_log_prob in samples:
    print(f"{prompt!r} -> {continuation!r}  (mean log-prob {mean_log_prob:.3f} per {unit})")


if __name__ == "__main__":
  app.run(main)
