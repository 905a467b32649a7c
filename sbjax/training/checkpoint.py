"""Orbax checkpoints of a ``TrainState``: every N steps, keep K, async, restore the newest."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from sbjax.training.steps import TrainState


class Checkpointer:
  """Saves a ``TrainState`` at multiples of ``every`` (and when forced), keeping the newest ``keep``.

  Saves are asynchronous: ``save`` returns once the arrays are copied off the devices, and
  ``close`` waits for the last write. Unfinished saves (the temporary directories a killed process
  leaves) are never restored and are deleted when a ``Checkpointer`` opens the directory.
  Under ``jax.distributed`` every process makes the same calls, on a directory they all see: each
  writes its own shards, and orbax (process 0) finalises a save once all have written.
  """

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every=}.")
    self.every = every
    # The interval is decided here, not by orbax, whose policy also saves the first step it sees.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def save(self, state: TrainState, *, force: bool = False) -> bool:
    """Saves at ``state.step`` if it is a multiple of ``every`` or ``force``; True if it did."""
    step = int(state.step)
    if (step % self.every and not force) or step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.StandardSave(state._asdict()), force=True)

  def latest_step(self) -> int | None:
    """The step of the newest finished checkpoint; ``None`` if there is none."""
    return self.manager.latest_step()

  def restore_latest(self, shardings: TrainState, like: TrainState) -> TrainState | None:
    """The newest finished checkpoint, placed with ``shardings``; ``None`` if there is none.

    Args:
      shardings: ``NamedSharding``s of every leaf of the state.
      like: a state of the right structure, shapes and dtypes (e.g. a freshly initialised one).
    """
    step = self.latest_step()
    if step is None:
      return None
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          like, shardings)
    return TrainState(**self.manager.restore(step, args=ocp.args.StandardRestore(target._asdict())))

  def close(self):
    """Waits for the last save to be written, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()
