"""``train``: the training loop with evaluation, TensorBoard metrics, a progress bar and resumable
checkpoints."""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable, Iterable, Mapping, NamedTuple

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from sbjax.parallel import batch_sharding, make_mesh
from sbjax.training import checkpoint
from sbjax.training.config import TrainConfig
from sbjax.training.optim import learning_rate_schedule, make_optimizer
from sbjax.training.steps import TrainState, init_train_state, make_eval_step, make_train_step

Batch = Mapping[str, np.ndarray]


class TrainResult(NamedTuple):
  state: TrainState  # the final state (on the mesh)
  metrics: list[dict]  # one dict per logging interval: "step" and the interval's mean metrics
  eval_metrics: list[dict]  # one dict per evaluation: "step", "loss", "accuracy", "tokens"


def _batches_from(batches: Callable[[int], Batch] | Iterable[Batch], start: int):
  """Batch of each step from ``start`` on: ``batches(step)``, or the iterable with ``start``
  items skipped (so a resumed run sees the batches an uninterrupted one would)."""
  if callable(batches):
    return (batches(step) for step in itertools.count(start))
  return itertools.islice(iter(batches), start, None)


def evaluate(eval_step, params, batches: Iterable[Batch], sharding) -> dict:
  """Token-weighted mean ``loss`` and ``accuracy`` over ``batches``, and the ``tokens`` scored."""
  totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  for batch in batches:
    sums = jax.device_get(eval_step(params, jax.device_put(dict(batch), sharding)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  tokens = max(totals["tokens"], 1.0)
  return {"loss": totals["loss_sum"] / tokens, "accuracy": totals["correct"] / tokens,
          "tokens": totals["tokens"]}


def train(
    model: nnx.Module,
    config: TrainConfig,
    batches: Callable[[int], Batch] | Iterable[Batch],
    workdir: str | None = None,
    *,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    mesh: Mesh | None = None,
) -> TrainResult:
  """Trains ``model`` for ``config.num_steps`` optimiser steps, resuming from ``workdir``.

  Args:
    model: an nnx model mapping ``inputs [B, T]`` (and optional ``segment_ids``, ``positions``)
      to logits ``[B, T, V]``; its parameters are updated in place at the end.
    config: the run's settings.
    batches: ``batches(step) -> batch`` (preferred: resumes exactly) or an iterable of batches.
      A batch is a dict of ``[B, T]`` NumPy arrays: ``inputs``, ``targets``, optional
      ``loss_mask``, ``segment_ids``, ``positions``; ``B`` divisible by the mesh's data size.
    workdir: where TensorBoard events (``workdir/tensorboard``) and checkpoints
      (``workdir/checkpoints``) go; ``None`` writes nothing.
    eval_batches: returns a fresh iterable of eval batches each time it is called.
    mesh: a ``("data", "model")`` mesh; default ``make_mesh(*config.mesh_shape)``.
  """
  mesh = mesh or make_mesh(*config.mesh_shape)
  tx, schedule = make_optimizer(config), learning_rate_schedule(config)
  graphdef, rest, state, shardings = init_train_state(model, tx, mesh)
  checkpointer = writer = None
  if workdir is not None:
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if config.checkpoint_every:
      checkpointer = checkpoint.Checkpointer(
          os.path.join(workdir, "checkpoints"), every=config.checkpoint_every,
          keep=config.keep_checkpoints, async_save=config.async_checkpoints)
      restored = checkpointer.restore_latest(shardings, state)
      if restored is not None:
        state = restored
        logging.warning("Resuming from step %d (%s).", int(state.step), workdir)
  train_step = make_train_step(graphdef, rest, tx, mesh, shardings, schedule)
  eval_step = make_eval_step(graphdef, rest, mesh, shardings.params) if eval_batches else None
  data_sharding = batch_sharding(mesh)

  def write(prefix, step, values):
    if writer is not None:
      for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)

  start = int(state.step)
  history, eval_history, pending = [], [], []
  bar = tqdm(total=config.num_steps, initial=start, disable=not config.progress_bar,
             desc="train", dynamic_ncols=True)
  tick = time.perf_counter()
  try:
    for step, batch in zip(range(start, config.num_steps), _batches_from(batches, start)):
      state, metrics = train_step(state, jax.device_put(dict(batch), data_sharding))
      pending.append(metrics)
      done = step + 1
      last = done == config.num_steps
      if done % config.log_every == 0 or last:
        # Fetching metrics waits for the device, so it happens once per interval only.
        values = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        now = time.perf_counter()
        values["steps_per_second"] = len(pending) / (now - tick)
        tick, pending = now, []
        write("train", done, values)
        history.append({"step": done, **values})
        bar.set_postfix(loss=f"{values['loss']:.4f}")
      if eval_step is not None and (last or (config.eval_every and done % config.eval_every == 0)):
        values = evaluate(eval_step, state.params, eval_batches(), data_sharding)
        write("eval", done, values)
        eval_history.append({"step": done, **values})
      if checkpointer is not None:
        checkpointer.save(state, force=last)
      bar.update(1)
  finally:
    if checkpointer is not None:
      checkpointer.close()  # an async save must not be cut off by the process ending
    if writer is not None:
      writer.close()
    bar.close()
  nnx.update(model, state.params)
  return TrainResult(state, history, eval_history)
