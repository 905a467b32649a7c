r"""Times the Mosaic GPU forward with parts of its per-logit work cut (see mosaic_ablation_lib),
beside JAX's FlashAttention-3 softmax forward and cuDNN, to say which resource bounds it.

  python experiments/mosaic_ablation.py --shape=4:12:128:16384 \
      --out=experiments/results/mosaic_ablation_h200.json
"""

from __future__ import annotations

import json
import time

from absl import app, flags
import jax

import logs
import mosaic_ablation_lib as lib

_SHAPE = flags.DEFINE_string("shape", "4:12:128:16384", "B:N:H:T.")
_VARIANTS = flags.DEFINE_list("variants", list(lib.VARIANTS), "Ablations, see the lib.")
_REFERENCES = flags.DEFINE_list("references", list(lib.REFERENCES), "Softmax references.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed repetitions (after 3 warm-ups).")
_OUT = flags.DEFINE_string("out", None, "Write the records here as JSON.")


def main(argv):
  del argv
  logs.install()
  shape = _SHAPE.value.split(":")
  if len(shape) != 4 or not all(x.isdigit() and int(x) > 0 for x in shape):
    raise app.UsageError(f"--shape must be B:N:H:T (positive ints), got {_SHAPE.value!r}.")
  for flag, known in ((_VARIANTS, lib.VARIANTS), (_REFERENCES, lib.REFERENCES)):
    if unknown := sorted(set(flag.value) - set(known)):
      raise app.UsageError(f"--{flag.name} must be among {tuple(known)}, got {unknown}.")
  b, n, h, t = (int(x) for x in shape)
  records = []
  for record in lib.run(b, t, n, h, variants=_VARIANTS.value, references=_REFERENCES.value,
                        iters=_ITERS.value):
    records.append(record)
    print(f"{record['name']:16s} {record['dtype']:9s} {record['ms']:8.2f} ms "
          f"{record['tflops']:7.1f} TFLOP/s", flush=True)
    if _OUT.value:  # after every record, so that a run cut short keeps what it measured
      with open(_OUT.value, "w") as f:
        json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                       date=time.strftime("%Y-%m-%d"), records=records), f, indent=1)


if __name__ == "__main__":
  app.run(main)
