r"""Times stick-breaking attention against cuDNN softmax attention and the scan path.

Forward and forward+backward, warm-up excluded, medians; TFLOP/s count 4*B*N*T^2*H/2 per forward
(causal) and 3.5x that per forward+backward; memory is XLA's compiled peak (arguments, outputs and
scratch). Results go to ``--out`` as JSON with the JAX version and device name.

  python experiments/benchmark.py --out=experiments/results/benchmark_h200.json
  python experiments/benchmark.py --shapes=4:12:128:16384 --impls=pallas --modes=fwd
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import sbjax
from sbjax.testing import median_time_ms

import logs

_SHAPES = flags.DEFINE_list(
    "shapes", ["4:12:128:2048", "4:12:128:4096", "4:12:128:8192", "4:12:128:16384", "8:16:64:4096"],
    "B:N:H:T per entry.")
_IMPLS = flags.DEFINE_list(
    "impls", ["pallas", "pallas_dense", "cudnn", "scan"],
    "pallas | pallas_dense (no skipping of used-up sticks: every key walked) | scan | xla | cudnn.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed repetitions (after 3 warm-ups).")
_SLOW_ITERS = flags.DEFINE_integer("slow_iters", 3, "Timed repetitions of the scan and xla paths.")
_BLOCK_SIZES = flags.DEFINE_string("block_sizes", None, "JSON dict overriding BlockSizes fields.")
_MAX_SCAN_T = flags.DEFINE_integer("max_scan_t", 16384, "Skip the scan/xla paths above this T.")
_OUT = flags.DEFINE_string("out", None, "Write the records here as JSON.")


def attention(impl: str, head_dim: int, dtype, block_sizes=None):
  if impl == "cudnn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  if impl == "pallas_dense":  # the library's blocks for this shape, every key walked
    block_sizes = dataclasses.replace(block_sizes or sbjax.BlockSizes.get_default(head_dim, dtype),
                                      skip_used_stick=False)
  if impl.startswith("pallas"):
    impl = "pallas"
  return lambda q, k, v: sbjax.stick_breaking_attention(
      q, k, v, implementation=impl, block_sizes=block_sizes)


def bench_one(impl, mode, b, n, h, t, dtype, iters, block_sizes=None) -> dict:
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), dtype) for _ in range(3))
  attn = attention(impl, h, dtype, block_sizes)
  if mode == "fwd":
    fn = jax.jit(attn)
  else:
    do = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    fn = jax.jit(lambda q, k, v: jax.vjp(attn, q, k, v)[1](do))
  compiled = fn.lower(q, k, v).compile()
  mem = compiled.memory_analysis()
  peak = None if mem is None else (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                   + mem.temp_size_in_bytes)
  ms = median_time_ms(compiled, (q, k, v), iters)
  flops = 4 * b * n * t * t * h / 2 * (1 if mode == "fwd" else 3.5)
  return dict(impl=impl, mode=mode, B=b, N=n, H=h, T=t, dtype=jnp.dtype(dtype).name, ms=ms,
              tflops=flops / ms / 1e9, peak_gib=None if peak is None else peak / 2**30)


def run(shapes, impls, modes, dtype, iters, block_sizes=None, max_scan_t=16384, slow_iters=3,
        log=print):
  records = []
  for shape in shapes:
    b, n, h, t = shape
    for mode in modes:
      for impl in impls:
        if impl in ("scan", "xla") and t > max_scan_t:
          continue
        try:
          rec = bench_one(impl, mode, b, n, h, t, dtype,
                          slow_iters if impl in ("scan", "xla") else iters, block_sizes)
        except Exception as e:  # pylint: disable=broad-except
          rec = dict(impl=impl, mode=mode, B=b, N=n, H=h, T=t, error=f"{type(e).__name__}: {e}"[:300])
        log(json.dumps(rec))
        records.append(rec)
  return records


def format_table(records) -> str:
  lines = [f"{'impl':8} {'mode':7} {'B':>2} {'N':>3} {'H':>4} {'T':>6} {'ms':>9} {'TFLOP/s':>8} {'GiB':>7}"]
  for r in records:
    if "error" in r:
      lines.append(f"{r['impl']:8} {r['mode']:7} {r['B']:>2} {r['N']:>3} {r['H']:>4} {r['T']:>6} "
                   f"ERROR {r['error'][:60]}")
      continue
    gib = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    lines.append(f"{r['impl']:8} {r['mode']:7} {r['B']:>2} {r['N']:>3} {r['H']:>4} {r['T']:>6} "
                 f"{r['ms']:9.3f} {r['tflops']:8.1f} {gib:>7}")
  return "\n".join(lines)


def main(argv):
  del argv
  logs.install()
  shapes = [tuple(int(x) for x in s.split(":")) for s in _SHAPES.value]
  block_sizes = None
  if _BLOCK_SIZES.value:
    block_sizes = sbjax.BlockSizes(**json.loads(_BLOCK_SIZES.value))
  records = run(shapes, _IMPLS.value, _MODES.value, jnp.dtype(_DTYPE.value), _ITERS.value,
                block_sizes, _MAX_SCAN_T.value, _SLOW_ITERS.value)
  if _OUT.value:
    meta = dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                block_sizes=None if block_sizes is None else dataclasses.asdict(block_sizes),
                iters=_ITERS.value, slow_iters=_SLOW_ITERS.value, argv=sys.argv[1:],
                date=time.strftime("%Y-%m-%d"))
    with open(_OUT.value, "w") as f:
      json.dump(dict(meta=meta, records=records), f, indent=1)
  print(format_table(records))


if __name__ == "__main__":
  app.run(main)
