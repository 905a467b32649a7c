r"""Training throughput (tokens/s) of a decoder LM: stick-breaking vs softmax + RoPE (cuDNN).

One device, bf16 compute with fp32 parameters, AdamW, the library's jitted train step; the step
time is the median over ``--steps`` timed steps after ``--warmup`` (the first compiles).

  python experiments/lm_throughput.py --preset=125m --batch=8 --seq_len=2048 \
      --out=experiments/results/lm_throughput_h200.json

At initialisation on random tokens every logit is near 0 and every stick is used up within a few
keys, which flatters skipping; ``--run_dir`` times a finished length-extrapolation run's trained
weights on real text instead (``--text_file``, tokenized by the run's tokenizer):

  python experiments/lm_throughput.py --run_dir=workdir_le/runs/stickbreaking-seed0-... \
      --text_file=book.txt --attentions=stickbreaking,stickbreaking_dense --seq_len=8192 --batch=2
"""

from __future__ import annotations

import json
import statistics
import time
import traceback

import jax
import numpy as np
from absl import app, flags
from flax import nnx

import sbjax
from sbjax import parallel, training
from sbjax.models import DecoderLM, count_params, lm_config

import generate_lib
import logs

_PRESET = flags.DEFINE_string("preset", "125m", "LM size: tiny | 125m | 350m.")
_ATTENTIONS = flags.DEFINE_list(
    "attentions", ["stickbreaking", "stickbreaking_dense", "softmax_rope"],
    "Attentions to time; stickbreaking_dense walks every key (BlockSizes(skip_used_stick=False)): "
    "what heads that attend far back cost, which random-token initialisations never show.")
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation", None, "Stick-breaking op implementation (None: Pallas on GPU, else scan).")
_SOFTMAX_IMPLEMENTATION = flags.DEFINE_string(
    "softmax_implementation", None, "Softmax implementation (None: cuDNN on GPU, else XLA).")
_FALLBACK = flags.DEFINE_string(
    "fallback", "scan",
    "Stick-breaking implementation to time if the default one fails ('' = none).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (the first compiles).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")
_RUN_DIR = flags.DEFINE_string(
    "run_dir", None, "A finished length-extrapolation run: time its trained weights (and its "
    "--preset is ignored); --attentions must be the run's (stickbreaking_dense for a "
    "stick-breaking run).")
_TEXT_FILE = flags.DEFINE_string(
    "text_file", None, "With --run_dir: text whose tokens fill the batch (repeated if short).")


def measure(build_model, tokens: np.ndarray, warmup: int, steps: int) -> dict:
  """Compiles and times the train step of ``build_model()`` on one device, on ``tokens``
  ``[B, T + 1]``."""
  mesh = parallel.make_mesh(1, 1)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    model = build_model()
  log = lambda what: print(
      f"  {model.config.attention}: {what} at {time.perf_counter() - start:.1f} s", flush=True)
  log("built")
  tx = training.make_optimizer(training.TrainConfig(num_steps=1000, warmup_steps=10))
  graphdef, rest, state, shardings = training.init_train_state(model, tx, mesh)
  step = training.make_train_step(graphdef, rest, tx, mesh, shardings)
  data = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                        parallel.batch_sharding(mesh))
  log("initialised")
  tick = time.perf_counter()
  for i in range(warmup):
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    log(f"warmup step {i}")
  loss = float(metrics["loss"])
  warmup_s = time.perf_counter() - tick
  times = []
  for _ in range(steps):
    tick = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - tick)
  median = statistics.median(times)
  batch, seq_len = tokens.shape[0], tokens.shape[1] - 1
  return {"params": count_params(model), "step_s_median": median, "step_s_min": min(times),
          "tokens_per_s": batch * seq_len / median, "warmup_s": warmup_s, "loss": loss,
          "finite": bool(np.isfinite(loss))}


def _trained(overrides: dict):
  """The --run_dir model with its trained weights and ``overrides``' kernel choices."""
  model, _ = generate_lib.load_run(_RUN_DIR.value, implementation=overrides["implementation"],
                                   block_sizes=overrides["block_sizes"])
  return model


def text_tokens(tokenizer, path: str, batch: int, seq_len: int) -> np.ndarray:
  """``[batch, seq_len + 1]`` consecutive token ids of the text in ``path`` (repeated if short)."""
  with open(path, encoding="utf-8") as f:
    ids = np.asarray(tokenizer.encode(f.read()), np.int32)
  if not ids.size:
    raise ValueError(f"text_file {path!r} has no tokens.")
  need = batch * (seq_len + 1)
  return np.resize(ids, need).reshape(batch, seq_len + 1)


def main(argv):
  del argv
  logs.install()
  batch, seq_len = _BATCH.value, _SEQ_LEN.value
  results = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
             "preset": _PRESET.value, "batch": batch, "seq_len": seq_len,
             "dtype": "bfloat16 compute, float32 params", "runs": {}}
  if _RUN_DIR.value:
    if not _TEXT_FILE.value:
      raise app.UsageError("--run_dir needs --text_file (real text for the trained weights).")
    attention = generate_lib.run_spec(_RUN_DIR.value)["attention"]
    wrong = [a for a in _ATTENTIONS.value if a.replace("_dense", "") != attention]
    if wrong:
      raise app.UsageError(f"--attentions: the run in --run_dir is {attention!r}, got {wrong}.")
    tokens = text_tokens(generate_lib.run_tokenizer(_RUN_DIR.value), _TEXT_FILE.value, batch,
                         seq_len)
    results.update(run_dir=_RUN_DIR.value, text_file=_TEXT_FILE.value, preset="(the run's)")
  else:
    config = lm_config(_PRESET.value)
    tokens = np.random.default_rng(0).integers(
        0, config.vocab_size, size=(batch, seq_len + 1)).astype(np.int32)
  for attention in _ATTENTIONS.value:
    impls = [_IMPLEMENTATION.value]
    if attention.startswith("stickbreaking") and _FALLBACK.value:
      impls.append(_FALLBACK.value)
    for impl in impls:
      dense = attention == "stickbreaking_dense"
      overrides = dict(attention="stickbreaking" if dense else attention, implementation=impl,
                       block_sizes=sbjax.BlockSizes(skip_used_stick=False) if dense else None)
      if _RUN_DIR.value:
        build = lambda o=overrides: _trained(o)
      else:
        config = lm_config(_PRESET.value, dtype="bfloat16",
                           softmax_implementation=_SOFTMAX_IMPLEMENTATION.value, **overrides)
        build = lambda c=config: nnx.jit(lambda: DecoderLM(c, rngs=nnx.Rngs(0)))()
      name = attention if impl is None else f"{attention}[{impl}]"
      try:
        results["runs"][name] = measure(build, tokens, _WARMUP.value, _STEPS.value)
        print(name, json.dumps(results["runs"][name]), flush=True)
        break
      except Exception as e:  # pylint: disable=broad-except
        results["runs"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        traceback.print_exc()
  runs = {k: v for k, v in results["runs"].items() if "tokens_per_s" in v}
  sm = [v for k, v in runs.items() if k.startswith("softmax_rope")]
  for name in ("stickbreaking", "stickbreaking_dense"):
    sb = [v for k, v in runs.items() if k == name or k.startswith(name + "[")]
    if sb and sm:
      results[f"{name}_over_softmax"] = sb[0]["tokens_per_s"] / sm[0]["tokens_per_s"]
  print(json.dumps(results, indent=1))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
