r"""Registers and spills of the Pallas Triton kernels on Hopper, without a GPU.

Needs a standalone Triton 3.6.0 (the GPU machine's) beside the venv, e.g.
``pip install --no-deps --target /tmp/triton triton==3.6.0`` (~190 MB), then:

  python experiments/kernel_resources.py --triton_path=/tmp/triton --dtype=float32 --head_dim=128 \
      --variants='{}' --variants='{"block_q_dq": 16, "num_warps_bwd": 8}'

Each ``--variants`` entry is a JSON dict of ``BlockSizes`` fields over the defaults.
"""

from __future__ import annotations

import json

from absl import app, flags

import kernel_resources_lib
import logs

_TRITON = flags.DEFINE_string("triton_path", None, "Directory holding the triton package.",
                              required=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim H.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512,
                                "T of the lowered op (the kernels do not depend on it).")
_VARIANTS = flags.DEFINE_multi_string("variants", ["{}"], "JSON dicts of BlockSizes fields.")
_OUT = flags.DEFINE_string("out", None, "Write the records as JSON here.")


def main(argv):
  del argv
  logs.install()
  records = []
  print(f"{'variant':50s} {'kernel':26s} warps stages regs spill(st/ld) stack")
  for variant in _VARIANTS.value:
    for r in kernel_resources_lib.report(head_dim=_HEAD_DIM.value, dtype=_DTYPE.value,
                                         overrides=json.loads(variant),
                                         triton_path=_TRITON.value, seq_len=_SEQ_LEN.value):
      records.append(r)
      print(f"{variant:50s} {r['kernel']:26s} {r['num_warps']:5d} {r['num_stages']:6d} "
            f"{r['registers']:4d} {r['spill_stores']:5d}/{r['spill_loads']:<5d} {r['stack']:5d}",
            flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(records, f, indent=1)


if __name__ == "__main__":
  app.run(main)
