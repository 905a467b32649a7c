r"""Times ``BlockSizes`` variants side by side in one process (the benchmark's inputs and timing).

Each ``--variants`` entry is a JSON dict of ``BlockSizes`` fields over the defaults ("{}": the
defaults themselves); every variant runs the same implementations, regimes and passes. With
``mosaic`` among ``--impls``, each ``--mosaic_variants`` entry (``MosaicBlockSizes`` fields) runs
the Mosaic GPU forward instead.

  python experiments/tune_block_sizes.py --shapes=4:12:128:16384 --regimes=far \
      --impls=pallas_dense --modes=fwd+bwd --variants='{}' --variants='{"block_q_dq": 32}'
"""

from __future__ import annotations

import dataclasses
import json

from absl import app, flags
import jax.numpy as jnp

import sbjax

import benchmark  # noqa: F401  (its flags: shapes, regimes, impls, modes, ...)
from benchmark_lib import format_table, run
import logs

_VARIANTS = flags.DEFINE_multi_string("variants", ["{}"], "JSON dicts of BlockSizes fields.")
_MOSAIC_VARIANTS = flags.DEFINE_multi_string("mosaic_variants", ["{}"],
                                             "JSON dicts of MosaicBlockSizes fields.")
_OUT = flags.DEFINE_string("out_variants", None, "Write the records (with their variant) here.")


def main(argv):
  del argv
  logs.install()
  flags_ = flags.FLAGS
  shapes = [tuple(int(x) for x in s.split(":")) for s in flags_.shapes]
  dtype = jnp.dtype(flags_.dtype)
  records = []
  triton_impls = [i for i in flags_.impls if i != "mosaic"]
  runs = [(v, triton_impls) for v in _VARIANTS.value if triton_impls]
  if "mosaic" in flags_.impls:
    runs += [(v, ["mosaic"]) for v in _MOSAIC_VARIANTS.value]
  for variant, impls in runs:
    overrides = json.loads(variant)
    for b, n, h, t in shapes:
      if impls == ["mosaic"]:
        sizes = dict(mosaic_block_sizes=sbjax.MosaicBlockSizes(**overrides))
      else:
        sizes = dict(block_sizes=dataclasses.replace(sbjax.BlockSizes.get_default(h, dtype),
                                                     **overrides))
      for record in run([(b, n, h, t)], flags_.regimes, impls, flags_.modes, dtype,
                        flags_.iters, skip_tolerance=flags_.skip_tolerance, log=lambda _: None,
                        **sizes):
        records.append(dict(record, variant=overrides))
        print(variant, format_table([record]).splitlines()[1], flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  app.run(main)
