"""MQRAR: stick-breaking vs softmax attention on multi-query repeated associative recall.

  python experiments/mqrar.py --config=experiments/configs/mqrar.py --workdir=/tmp/mqrar
  python experiments/mqrar.py --config=experiments/configs/mqrar.py:sweep --workdir=/tmp/sweep

Ends on a table of accuracy per attention and setting (at each cell's best learning rate) and
eval length, what the numbers mean, and where the outputs are.
"""

from absl import app, flags
from ml_collections import config_flags

import logs
import mqrar_lib
import mqrar_report
import mqrar_sweep_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where summary.json, mqrar.png and runs/ go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.install()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config.vmap:  # the GPU sweep: runs trained in vmapped groups
    records = mqrar_sweep_lib.train_and_evaluate(config, workdir)
    print("\n" + mqrar_report.report(records, workdir), flush=True)
  else:
    records = mqrar_lib.train_and_evaluate(config, workdir)
    print("\n" + mqrar_lib.report(records, workdir), flush=True)


if __name__ == "__main__":
  app.run(main)
