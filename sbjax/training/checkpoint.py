"""Orbax checkpoints of a ``TrainState``: every N steps, keep K, async, restore the newest."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from sbjax.training.steps import TrainState


def make_checkpoint_manager(directory: str, *, every: int, keep: int,
                            async_save: bool = True) -> ocp.CheckpointManager:
  """A manager saving every ``every`` steps and keeping the newest ``keep``.

  Unfinished saves (temporary directories left by a killed process) are never restored and are
  deleted when the manager opens.
  """
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=every, max_to_keep=keep, create=True, cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, *, force: bool = False) -> bool:
  """Saves at ``state.step`` if the interval says so (always with ``force``); True if it did.

  Returns as soon as the arrays are copied off the devices; ``manager.wait_until_finished()``
  waits for the write.
  """
  step = int(state.step)
  if force and step in manager.all_steps():
    return False
  return manager.save(step, args=ocp.args.StandardSave(state._asdict()), force=force)


def restore_latest(manager: ocp.CheckpointManager, shardings: TrainState,
                   like: TrainState) -> TrainState | None:
  """The newest finished checkpoint, placed with ``shardings``; ``None`` if there is none.

  Args:
    manager: the checkpoint manager.
    shardings: ``NamedSharding``s of every leaf of the state.
    like: a state of the right structure, shapes and dtypes (e.g. a freshly initialised one).
  """
  step = manager.latest_step()
  if step is None:
    return None
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        like, shardings)
  restored = manager.restore(step, args=ocp.args.StandardRestore(target._asdict()))
  return TrainState(**restored)
