r"""Times one decode step (Q=1) of stick-breaking attention against softmax decode on the same cache.

For each shape (B, cache length S, N query heads, K kv heads, H, bf16) and logit regime, one step
of each implementation over a cache filled to ``cache_len = S`` (plus one ragged case):

  pallas_dense  the Pallas decode kernel walking every key (``skip_tolerance=None``)
  pallas        the kernel with exact skipping (``skip_tolerance=0.0``, the default)
  pallas_tol    the kernel with ``skip_tolerance=1e-3`` (recorded as skipped where the op rejects it)
  xla           the portable chunked path (exact skipping); only up to ``--max_xla_cache_len``
  softmax       ``jax.nn.dot_product_attention`` with ``key_value_seq_lengths=cache_len``:
                cuDNN where it accepts Q=1, else XLA's (the record says which)

Regimes (values are N(0, 1) in all; the default scale ``1/sqrt(H)``):

  local    q, k ~ N(0, 1): logits ~ N(0, 1), each key takes about half of what is left of the stick.
  far      q[..., 0] = -1, k[..., 0] = bf16(5 sqrt(H)) = 56.5, the other components N(0, 1):
           logits ~ -4.99 + N(0, 127/128); each key takes about 1% of the stick.
  trained  the trained heads of ``experiments/results/length_extrapolation/qk_stickbreaking.npz``
           (3 layers x 2 heads of H=64, fp16): kv head k holds pair k % 6 with its head dim
           concatenated twice (H=128), the query likewise and multiplied by ``scale * sqrt(H) / 2``
           before the bf16 cast, so that the default scale gives the trained logits; the 4096
           positions are tiled along S; row b's query is the trained query at position
           ``p_b = 4095 - 16 b``, placed at ``cache_len - 1`` with the keys before it in order.
           The G query heads of a kv head share its trained query.

Random keys and values are a block of 8192 positions (a host RNG, fixed seed) tiled along S with a
per-row offset, so that building a 48 GiB cache needs no more memory than the cache. Shapes whose
K+V cache exceeds ``--max_memory_fraction`` of the device's memory are recorded as skipped.

A sample is ``repeats`` back-to-back steps (enough for ``--min_sample_ms``) over their count, so
Python's dispatch overlaps the GPU as in a generate loop on device; ``ms`` is the median of
``--iters`` samples after 3 warm-up steps. ``kv_bytes_read`` counts K and V bytes: from the op's
``keys_read`` where it returns one (``keys_read_source="op"``), else every key below ``cache_len``;
``hbm_fraction`` is bytes / time / the GPU's peak HBM bandwidth. Stick-breaking records also give
``max_abs_diff_vs_dense``, their largest difference from ``pallas_dense`` (0 for exact skipping).

  python experiments/benchmark_decode.py --out=experiments/results/benchmark_decode_h100.json
  python experiments/benchmark_decode.py --batch=8 --cache_len=32768 --kv_heads=4 --regimes=local
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp

import sbjax

from benchmark_decode_lib import IMPLEMENTATIONS, REGIMES, cases, format_table, run
import logs

_BATCH = flags.DEFINE_list("batch", ["1", "8", "64"], "Batch sizes B.")
_CACHE_LEN = flags.DEFINE_list("cache_len", ["4096", "32768", "131072"], "Cache lengths S.")
_KV_HEADS = flags.DEFINE_list("kv_heads", ["12", "4"], "KV heads K.")
_HEADS = flags.DEFINE_integer("heads", 12, "Query heads N.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim H (the trained regime needs 128).")
_RAGGED = flags.DEFINE_string("ragged", "8:32768:4", "B:S:K of one case with ragged cache_len "
                              "(row b filled to S - b S / (2B)); empty for none.")
_IMPLS = flags.DEFINE_list("impls", list(IMPLEMENTATIONS), "|".join(IMPLEMENTATIONS))
_REGIMES = flags.DEFINE_list("regimes", list(REGIMES), "|".join(REGIMES))
_ITERS = flags.DEFINE_integer("iters", 20, "Timed samples (after 3 warm-up steps).")
_SLOW_ITERS = flags.DEFINE_integer("slow_iters", 5, "Timed samples of the xla path.")
_MIN_SAMPLE_MS = flags.DEFINE_float("min_sample_ms", 2.0, "Back-to-back steps per sample: enough "
                                    "for this long.")
_MAX_XLA_S = flags.DEFINE_integer("max_xla_cache_len", 32768, "Skip the xla path above this S.")
_MAX_MEMORY = flags.DEFINE_float("max_memory_fraction", 0.75, "Skip shapes whose K+V cache is "
                                 "above this fraction of the device's memory limit.")
_BLOCK_SIZES = flags.DEFINE_string("block_sizes", None, "JSON dict of DecodeBlockSizes fields.")
_OUT = flags.DEFINE_string("out", None, "Write the records here as JSON.")

def main(argv):
  del argv
  logs.install()
  ints = lambda xs: [int(x) for x in xs]
  ragged = ints(_RAGGED.value.split(":")) if _RAGGED.value else None
  block_sizes = None
  if _BLOCK_SIZES.value:
    block_sizes = sbjax.DecodeBlockSizes(**json.loads(_BLOCK_SIZES.value))
  print(jax.__version__, jax.devices()[0].device_kind, flush=True)
  records = run(cases(ints(_BATCH.value), ints(_CACHE_LEN.value), ints(_KV_HEADS.value),
                      _HEADS.value, _HEAD_DIM.value, ragged),
                _IMPLS.value, _REGIMES.value, jnp.bfloat16, iters=_ITERS.value,
                slow_iters=_SLOW_ITERS.value, min_sample_ms=_MIN_SAMPLE_MS.value,
                max_xla_cache_len=_MAX_XLA_S.value, max_memory_fraction=_MAX_MEMORY.value,
                block_sizes=block_sizes)
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
