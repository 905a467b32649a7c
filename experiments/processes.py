"""The experiments' multi-process flags: ``jax.distributed`` set up from the command line.

One process per host (or per GPU) runs the same command; on SLURM, Open MPI or Kubernetes
``--distributed`` finds the cluster from the environment, elsewhere the three address flags say it:

  python experiments/mqrar.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
  python experiments/mqrar.py ... --coordinator_address=host0:1234 --num_processes=2 --process_id=1

Every process then trains and scores alike on the global mesh (each supplying its rows of every
batch); process 0 alone writes the results and logs at INFO, the others log warnings only.
"""

from __future__ import annotations

from absl import flags
from absl import logging
import jax

from sbjax import training

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with the cluster found from the "
    "environment (SLURM, Open MPI, Kubernetes).")
_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                               "host:port of process 0, for a jax.distributed run of "
                               "--num_processes processes (with --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to "
                                   "num_processes - 1.")


def initialize() -> None:
  """Starts ``jax.distributed`` when the flags ask for it (before any other JAX call), and keeps
  the logs of every process but 0 to warnings. Without the flags: one process, nothing done."""
  explicit = {"coordinator_address": _ADDRESS.value, "num_processes": _NUM_PROCESSES.value,
              "process_id": _PROCESS_ID.value}
  given = [name for name, value in explicit.items() if value is not None]
  if given and len(given) < len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise flags.ValidationError(f"--{', --'.join(given)} given without --{', --'.join(missing)}: "
                                "a jax.distributed run needs all three.")
  if given:
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise flags.ValidationError(f"--process_id must be in [0, --num_processes="
                                  f"{_NUM_PROCESSES.value}), got {_PROCESS_ID.value}.")
    if _PROCESS_ID.value:
      logging.set_verbosity(logging.WARNING)  # JAX's own notes while connecting too
    jax.distributed.initialize(**explicit)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  else:
    return
  if not training.is_primary():
    logging.set_verbosity(logging.WARNING)
  logging.info("jax.distributed: %d processes, %d devices.", jax.process_count(),
               jax.device_count())
