"""MQRAR: stick-breaking vs softmax attention on multi-query repeated associative recall.

  python experiments/mqrar.py --config=experiments/configs/mqrar.py --workdir=/tmp/mqrar
  python experiments/mqrar.py --config=experiments/configs/mqrar.py:sweep --workdir=/tmp/sweep

Several processes (``--distributed``, or ``--coordinator_address``, ``--num_processes`` and
``--process_id``: see ``processes.py``) train each run of the default, unvmapped path on one mesh
over all their devices; process 0 writes the results and the report.

Ends on a table of accuracy per attention and setting (at each cell's best learning rate) and
eval length, what the numbers mean, and where the outputs are.
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from sbjax import training

import logs
import mqrar_lib
import mqrar_report
import mqrar_sweep_lib
import processes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where summary.json, mqrar.png and runs/ go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.install()
  processes.initialize()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config.vmap:  # the GPU sweep: runs trained in vmapped groups
    if jax.process_count() > 1:
      raise app.UsageError(f"config.vmap=True trains on one device; {jax.process_count()} "
                           "processes were started (use vmap=False for a multi-process run).")
    report = mqrar_report.report(mqrar_sweep_lib.train_and_evaluate(config, workdir), workdir)
  else:
    report = mqrar_lib.report(mqrar_lib.train_and_evaluate(config, workdir), workdir)
  if training.is_primary():
    print("\n" + report, flush=True)


if __name__ == "__main__":
  app.run(main)
