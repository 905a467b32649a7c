"""Length extrapolation on real text: stick-breaking vs softmax+RoPE vs NoPE, trained at T and
scored to 16 T.

  python experiments/length_extrapolation.py \
      --config=experiments/configs/length_extrapolation.py --workdir=/tmp/length_extrapolation

Several processes (``--distributed``, or ``--coordinator_address``, ``--num_processes`` and
``--process_id``: see ``processes.py``) train and score each run on one mesh over all their
devices, each supplying its rows of every batch; process 0 writes the outputs.
"""

from absl import app, flags
from ml_collections import config_flags

import length_extrapolation_lib
import logs
import processes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where summary.json, the plots and runs/ go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.install()
  processes.initialize()
  length_extrapolation_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
