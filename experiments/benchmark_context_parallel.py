r"""Context parallelism on GPUs: the op with ``T`` sharded over ``C`` devices against one device.

Times forward and forward+backward of ``sbjax.context_parallel.stick_breaking_attention`` on a
``(1, 1, C)`` mesh and of the same op on the first device, side by side, on logits shaped like
real heads (``benchmark.py``'s regimes), with exact skipping and with the dense walk; records the
speed-up, the compiled peak memory per device and the forward's agreement with one device
(records described in ``benchmark_context_parallel_lib``). A length one device cannot hold
records its error there and the run goes on.

  # issue 12's runs on 2 GPUs (B=1, N=12, H=128, bf16); one GPU at 262,144 compiled only:
  python experiments/benchmark_context_parallel.py --seq_lens=65536,262144 \
      --single_max_len=65536 --out=experiments/results/context_parallel_h200x2.json
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmark_context_parallel_lib import MODES, WALKS, format_table, run
import logs

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["65536", "262144"], "Sequence lengths T.")
_REGIMES = flags.DEFINE_list("regimes", ["far", "trained"], "Logit regimes (benchmark.py's).")
_WALKS = flags.DEFINE_list("walks", list(WALKS), "skip (exact skipping) and/or dense.")
_MODES = flags.DEFINE_list("modes", list(MODES), "fwd and/or fwd+bwd.")
_BATCH = flags.DEFINE_integer("batch", 1, "B.")
_HEADS = flags.DEFINE_integer("heads", 12, "N (query and kv heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "H.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_CONTEXT = flags.DEFINE_integer("context", None, "Devices on the context axis (default: all).")
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation", None, "Chunk implementation (None: the Pallas kernels on a GPU, else scan).")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Pallas in interpret mode (CPU smoke runs).")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed repetitions (after 3 warm-ups).")
_SINGLE_MAX_LEN = flags.DEFINE_integer(
    "single_max_len", None, "Above this T the one-device run is only compiled (its peak memory "
    "recorded against the device's), not timed.")
_OUT = flags.DEFINE_string("out", None, "Write the records here as JSON.")


def main(argv):
  del argv
  logs.install()
  records = run([int(t) for t in _SEQ_LENS.value], _REGIMES.value, _WALKS.value, _MODES.value,
                batch=_BATCH.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value,
                dtype=jnp.dtype(_DTYPE.value), context=_CONTEXT.value or jax.device_count(),
                iters=_ITERS.value, implementation=_IMPLEMENTATION.value,
                interpret=_INTERPRET.value, single_max_len=_SINGLE_MAX_LEN.value)
  if _OUT.value:
    info = dict(iters=_ITERS.value, date=time.strftime("%Y-%m-%d"))
    with open(_OUT.value, "w") as f:
      json.dump([dict(r, **info) for r in records], f, indent=1)
  print(format_table(records))


if __name__ == "__main__":
  app.run(main)
