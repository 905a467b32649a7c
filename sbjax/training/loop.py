"""``train``: the training loop with evaluation, TensorBoard metrics, a progress bar and resumable
checkpoints, in one process or several (``jax.distributed``)."""

from __future__ import annotations

import itertools
import json
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
from sbjax.training.distributed import global_batch, is_primary
from sbjax.training.optim import learning_rate_schedule, make_optimizer
from sbjax.training.steps import TrainState, init_train_state, make_eval_step, make_train_step

Batch = Mapping[str, np.ndarray]


class TrainResult(NamedTuple):
  state: TrainState  # the final state (on the mesh)
  metrics: list[dict]  # per logging interval of the whole run: "step" and the interval's means
  eval_metrics: list[dict]  # per evaluation of the whole run: "step", "loss", "accuracy", "tokens"


def _batches_from(batches: Callable[[int], Batch] | Iterable[Batch], start: int):
  """Batch of each step from ``start`` on: ``batches(step)``, or the iterable with ``start``
  items skipped (so a resumed run sees the batches an uninterrupted one would)."""
  if callable(batches):
    return (batches(step) for step in itertools.count(start))
  return itertools.islice(iter(batches), start, None)


def evaluate(eval_step, params, batches: Iterable[Batch], sharding) -> dict:
  """Token-weighted mean ``loss`` and ``accuracy`` over ``batches`` (this process's rows of each
  global batch), and the ``tokens`` scored."""
  totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  for batch in batches:
    sums = jax.device_get(eval_step(params, global_batch(batch, sharding)))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  tokens = max(totals["tokens"], 1.0)
  return {"loss": totals["loss_sum"] / tokens, "accuracy": totals["correct"] / tokens,
          "tokens": totals["tokens"]}


CONFIG_FILE = "train_config.json"  # the TrainConfig a workdir's checkpoints were made with
METRICS_FILE = "metrics.jsonl"  # every logged train and eval entry, one JSON object per line


def _write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)  # a killed process never leaves a half-written file


def _check_resumable(workdir: str, config: TrainConfig) -> None:
  """Raises ``ValueError`` if ``workdir``'s checkpoints were made with a config that computes
  something else (another learning rate, number of steps, ...), naming what differs."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return  # checkpoints of an older sbjax: nothing to compare with
  with open(path) as f:
    conflicts = config.resume_conflicts(json.load(f))
  if conflicts:
    raise ValueError(
        f"workdir={workdir!r} holds checkpoints of a run with another config "
        f"({'; '.join(conflicts)}); resuming them would mix two runs. Use another workdir, or "
        f"delete {os.path.join(workdir, 'checkpoints')} to start over.")


def read_metrics_log(path: str, upto: int, *, rewrite: bool = True) -> list[dict]:
  """The JSON lines of the metrics log ``path`` at steps ``<= upto``, rewriting the file (unless
  not ``rewrite``) without the later ones (logged after the checkpoint a run resumes from, they are
  redone) and without a last line cut off by a killed process. A missing file reads as empty."""
  entries = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          entries.append(json.loads(line))
        except json.JSONDecodeError:
          break  # the last line of a killed process may be cut off
  entries = [e for e in entries if e["step"] <= upto]
  if not rewrite:
    return entries
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in entries)
  os.replace(path + ".tmp", path)
  return entries


def _read_metrics(workdir: str, upto: int) -> tuple[list[dict], list[dict]]:
  """The train and eval entries logged in ``workdir`` at steps ``<= upto`` (only the primary
  process rewrites the log)."""
  entries = read_metrics_log(os.path.join(workdir, METRICS_FILE), upto, rewrite=is_primary())
  history = [{k: v for k, v in e.items() if k != "split"} for e in entries if e["split"] == "train"]
  eval_history = [{k: v for k, v in e.items() if k != "split"} for e in entries
                  if e["split"] == "eval"]
  return history, eval_history


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

  A workdir whose newest checkpoint is at ``num_steps`` trains nothing: the result holds the
  run's logged metrics, read back, and (given ``eval_batches``) a fresh final evaluation.
  Checkpoints made with a config that differs outside ``RESUMABLE_FIELDS`` are never resumed:
  ``ValueError`` names the differences.

  Multi-process runs: every process calls ``jax.distributed.initialize()``, builds the same model
  (same seed) and calls ``train`` with the same arguments; the mesh spans every process's devices.
  ``batches`` and ``eval_batches`` return this process's rows of each global batch
  (``process_batch_rows(B, mesh)``: process ``p`` of ``P`` holds rows ``p * B / P`` up to
  ``(p + 1) * B / P`` when ``"data"`` spans the processes). All processes save and restore the
  checkpoints (``workdir`` must be a filesystem they all see); process 0 alone writes
  TensorBoard, ``metrics.jsonl``, ``train_config.json``, the progress bar and log messages. Every
  process returns the same ``TrainResult``.

  Args:
    model: an nnx model mapping ``inputs [B, T]`` (and optional ``segment_ids``, ``positions``)
      to logits ``[B, T, V]``; its parameters are updated in place at the end.
    config: the run's settings.
    batches: ``batches(step) -> batch`` (preferred: resumes exactly) or an iterable of batches.
      A batch is a dict of ``[B, T]`` NumPy arrays: ``inputs``, ``targets``, optional
      ``loss_mask``, ``segment_ids``, ``positions``; ``B`` divisible by the mesh's data size.
      With several processes, ``[B_local, T]``: this process's rows.
    workdir: where TensorBoard events (``workdir/tensorboard``), checkpoints
      (``workdir/checkpoints``), the config they belong to (``train_config.json``) and every logged
      metric (``metrics.jsonl``) go; ``None`` writes nothing.
    eval_batches: returns a fresh iterable of eval batches each time it is called.
    mesh: a ``("data", "model", "context")`` mesh (``sbjax.parallel.make_mesh``); default
      ``make_mesh(*config.mesh_shape)``.

  Returns:
    The final state and the whole run's metrics (resumed runs included) as ``TrainResult``.
  """
  mesh = mesh or make_mesh(*config.mesh_shape)
  primary = is_primary()  # process 0 writes the logs
  tx, schedule = make_optimizer(config), learning_rate_schedule(config)
  graphdef, rest, state, shardings = init_train_state(model, tx, mesh)
  checkpointer = writer = metrics_file = None
  if workdir is not None and config.checkpoint_every:
    checkpointer = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=config.checkpoint_every,
        keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    if checkpointer.latest_step() is not None:
      _check_resumable(workdir, config)
      state = checkpointer.restore_latest(shardings, state)
      if primary:
        logging.warning("Resuming from step %d (%s).", int(state.step), workdir)
  start = int(state.step)
  if start > config.num_steps:
    raise ValueError(f"workdir={workdir!r} holds a checkpoint at step {start}, beyond "
                     f"num_steps={config.num_steps}.")
  history, eval_history = [], []
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    if checkpointer is not None and primary:
      _write_json(os.path.join(workdir, CONFIG_FILE), config.to_json())
    history, eval_history = _read_metrics(workdir, start)
    if primary:
      writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      metrics_file = open(os.path.join(workdir, METRICS_FILE), "a")
  train_step = make_train_step(graphdef, rest, tx, mesh, shardings, schedule)
  eval_step = make_eval_step(graphdef, rest, mesh, shardings.params) if eval_batches else None
  data_sharding = batch_sharding(mesh)

  def log(split, step, values):
    (history if split == "train" else eval_history).append({"step": step, **values})
    if writer is not None:
      for name, value in values.items():
        writer.add_scalar(f"{split}/{name}", value, step)
    if metrics_file is not None:
      metrics_file.write(json.dumps({"split": split, "step": step, **values}) + "\n")
      metrics_file.flush()

  bar, pending = None, []
  try:
    if start == config.num_steps:
      if primary:
        logging.warning("The run in %s is already complete (step %d of %d): nothing to train.",
                        workdir, start, config.num_steps)
      if eval_step is not None:
        values = evaluate(eval_step, state.params, eval_batches(), data_sharding)
        if eval_history and eval_history[-1]["step"] == start:
          eval_history[-1] = {"step": start, **values}  # rerun, not logged twice
        else:
          log("eval", start, values)
    tick = time.perf_counter()
    for step, batch in zip(range(start, config.num_steps), _batches_from(batches, start)):
      state, metrics = train_step(state, global_batch(batch, data_sharding))
      pending.append(metrics)
      done = step + 1
      last = done == config.num_steps
      if bar is None:
        # The first step compiles; the bar's clock (its rate and ETA) starts once it is done.
        jax.block_until_ready(metrics)
        compile_seconds = time.perf_counter() - tick
        tick, timed = time.perf_counter(), 0
        bar = tqdm(total=config.num_steps, initial=done,
                   disable=not (config.progress_bar and primary),
                   desc=f"train (compiled in {compile_seconds:.1f}s)", dynamic_ncols=True)
      else:
        timed += 1
        bar.update(1)
      if done % config.log_every == 0 or last:
        # Fetching metrics waits for the device, so it happens once per interval only.
        values = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        now = time.perf_counter()
        # Steps timed since the last write; the first step, which compiles, is not timed.
        values["steps_per_second"] = timed / (now - tick) if timed else 1 / compile_seconds
        tick, timed, pending = now, 0, []
        log("train", done, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
      if eval_step is not None and (last or (config.eval_every and done % config.eval_every == 0)):
        log("eval", done, evaluate(eval_step, state.params, eval_batches(), data_sharding))
      if checkpointer is not None:
        checkpointer.save(state, force=last)
  finally:
    if checkpointer is not None:
      checkpointer.close()  # an async save must not be cut off by the process ending
    if writer is not None:
      writer.close()
    if metrics_file is not None:
      metrics_file.close()
    if bar is not None:
      bar.close()
  nnx.update(model, state.params)
  return TrainResult(state, history, eval_history)
