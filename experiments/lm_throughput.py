r"""Training throughput (tokens/s) of a decoder LM: stick-breaking vs softmax + RoPE (cuDNN).

One device, bf16 compute with fp32 parameters, AdamW, the library's jitted train step; the step
time is the median over ``--steps`` timed steps after ``--warmup`` (the first compiles).

  python experiments/lm_throughput.py --preset=125m --batch=8 --seq_len=2048 \
      --out=experiments/results/lm_throughput_h200.json
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
    "fallback", "scan", "Stick-breaking implementation to time if the default one fails ('' = none).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps (the first compiles).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")


def measure(config, batch: int, seq_len: int, warmup: int, steps: int) -> dict:
  """Compiles and times the train step of ``DecoderLM(config)`` on one device."""
  mesh = parallel.make_mesh(1, 1)
  start = time.perf_counter()
  log = lambda what: print(f"  {config.attention}: {what} at {time.perf_counter() - start:.1f} s", flush=True)
  with jax.set_mesh(mesh):
    model = nnx.jit(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))()
  log("built")
  tx = training.make_optimizer(training.TrainConfig(num_steps=1000, warmup_steps=10))
  graphdef, rest, state, shardings = training.init_train_state(model, tx, mesh)
  step = training.make_train_step(graphdef, rest, tx, mesh, shardings)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, size=(batch, seq_len + 1)).astype(np.int32)
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
  return {"params": count_params(model), "step_s_median": median, "step_s_min": min(times),
          "tokens_per_s": batch * seq_len / median, "warmup_s": warmup_s, "loss": loss,
          "finite": bool(np.isfinite(loss))}


def main(argv):
  del argv
  logs.install()
  results = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
             "preset": _PRESET.value, "batch": _BATCH.value, "seq_len": _SEQ_LEN.value,
             "dtype": "bfloat16 compute, float32 params", "runs": {}}
  for attention in _ATTENTIONS.value:
    impls = [_IMPLEMENTATION.value]
    if attention.startswith("stickbreaking") and _FALLBACK.value:
      impls.append(_FALLBACK.value)
    for impl in impls:
      dense = attention == "stickbreaking_dense"
      config = lm_config(_PRESET.value, attention="stickbreaking" if dense else attention,
                         implementation=impl, dtype="bfloat16",
                         softmax_implementation=_SOFTMAX_IMPLEMENTATION.value,
                         block_sizes=sbjax.BlockSizes(skip_used_stick=False) if dense else None)
      name = attention if impl is None else f"{attention}[{impl}]"
      try:
        results["runs"][name] = measure(config, _BATCH.value, _SEQ_LEN.value, _WARMUP.value,
                                        _STEPS.value)
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
