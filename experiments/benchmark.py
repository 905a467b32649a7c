r"""Times stick-breaking attention against cuDNN softmax attention and the scan path, on logits
shaped like those of real heads.

Regimes (logits ``z = scale q . k`` per head, built by ``benchmark_inputs``): ``local``
(z ~ N(0, 1): every stick is used up within a few hundred keys), ``far`` (z ~ -5 + N(0, 1): each
key takes ~1%, sticks last ~20K keys), ``mixed`` (half the heads of each), ``retrieval``
(z ~ -6 + N(0, 1) with 1% of keys at +10) and ``trained`` (q/k of six heads of the
length-extrapolation model, experiments/results/length_extrapolation/qk_stickbreaking.npz, tiled
to the shape).
Implementations: ``pallas`` (the Triton kernels, forced, with their default exact skipping;
``implementation="pallas"`` itself takes the Mosaic forward on Hopper), ``pallas_dense`` (every key
walked), ``pallas_tol`` (``skip_tolerance``, default 1e-3; its forward error against
``pallas_dense``, ``max_err`` = max|out - out_dense| / max|v|, and ``max_err_beyond_ulp``, the same
less one ulp of the output dtype, are recorded), ``mosaic``, ``mosaic_dense`` and ``mosaic_tol``
(the same three for the Mosaic GPU kernels), ``cudnn`` (softmax) and
``scan``; softmax and scan do not depend on the regime and run once per shape ("any").

Forward, backward alone (from residuals computed beforehand) and forward+backward, warm-up
excluded, medians; TFLOP/s count 4*B*N*T^2*H/2 per forward (causal), 2.5x that per backward and
3.5x per forward+backward; ``peak_bytes`` is XLA's compiled peak (arguments,
outputs and scratch). Results go to ``--out`` as JSON records with the JAX version and GPU.

  python experiments/benchmark.py --out=experiments/results/benchmark_h200.json
  python experiments/benchmark.py --shapes=4:12:128:16384 --impls=pallas --modes=fwd --regimes=far
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags
import jax.numpy as jnp

import sbjax

from benchmark_lib import IMPLEMENTATIONS, REGIMES, format_table, run
import logs

_SHAPES = flags.DEFINE_list("shapes", ["4:12:128:4096", "4:12:128:16384"], "B:N:H:T per entry.")
_REGIMES = flags.DEFINE_list("regimes", list(REGIMES), "Logit regimes, see the module docstring.")
_IMPLS = flags.DEFINE_list("impls", list(IMPLEMENTATIONS), "Implementations, see the docstring.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "Among fwd, bwd (the backward alone) "
                           "and fwd+bwd.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_TOLERANCE = flags.DEFINE_float("skip_tolerance", 1e-3, "skip_tolerance of pallas_tol.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed repetitions (after 3 warm-ups).")
_SLOW_ITERS = flags.DEFINE_integer("slow_iters", 3, "Timed repetitions of the scan path.")
_BLOCK_SIZES = flags.DEFINE_string("block_sizes", None, "JSON dict overriding BlockSizes fields.")
_MOSAIC_BLOCK_SIZES = flags.DEFINE_string(
    "mosaic_block_sizes", None, "JSON dict of MosaicBlockSizes fields over the op's tuned tiling "
    "(MosaicBlockSizes.get_default), e.g. '{\"block_k_dkv\": 64}'.")
_MAX_SCAN_T = flags.DEFINE_integer("max_scan_t", 16384, "Skip the scan path above this T.")
_OUT = flags.DEFINE_string("out", None, "Write the records here as JSON.")

def main(argv):
  del argv
  logs.install()
  shapes = [tuple(int(x) for x in s.split(":")) for s in _SHAPES.value]
  block_sizes = None
  if _BLOCK_SIZES.value:
    block_sizes = sbjax.BlockSizes(**json.loads(_BLOCK_SIZES.value))
  mosaic_block_sizes = None
  if _MOSAIC_BLOCK_SIZES.value:
    head_dims = {h for _, _, h, _ in shapes}
    if len(head_dims) > 1:
      raise app.UsageError(f"--mosaic_block_sizes needs one head dim across --shapes (the tuned "
                           f"tiling it overrides is per head dim), got {sorted(head_dims)}.")
    mosaic_block_sizes = dataclasses.replace(
        sbjax.MosaicBlockSizes.get_default(head_dims.pop(), jnp.dtype(_DTYPE.value)),
        **json.loads(_MOSAIC_BLOCK_SIZES.value))
  records = run(shapes, _REGIMES.value, _IMPLS.value, _MODES.value, jnp.dtype(_DTYPE.value),
                _ITERS.value, block_sizes=block_sizes, skip_tolerance=_TOLERANCE.value,
                max_scan_t=_MAX_SCAN_T.value, slow_iters=_SLOW_ITERS.value,
                mosaic_block_sizes=mosaic_block_sizes)
  if _OUT.value:  # a list of records, each with how it was run
    run_info = dict(block_sizes=_BLOCK_SIZES.value, mosaic_block_sizes=_MOSAIC_BLOCK_SIZES.value,
                    iters=_ITERS.value, date=time.strftime("%Y-%m-%d"))
    with open(_OUT.value, "w") as f:
      json.dump([dict(r, **run_info) for r in records], f, indent=1)
  print(format_table(records))


if __name__ == "__main__":
  app.run(main)
