"""MQRAR experiment: train a decoder LM per attention and setting, score recall, plot.

``train_and_evaluate(config, workdir)`` runs the product of the config's sweep axes (attentions,
seeds, d_model, num_heads, seq_len, num_keys). Each run trains ``sbjax.models.DecoderLM`` with
``sbjax.training.train`` (TensorBoard, progress bar and checkpoints under
``workdir/runs/<run>/``) on MQRAR batches drawn on the fly, then scores accuracy at every key
query of held-out sequences at each ``eval_seq_lens`` length. After each run ``summary.json``
(one record per run and eval length) and ``mqrar.png`` are rewritten, so an interrupted sweep
keeps what finished, and a rerun skips the runs already in the summary.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import time

import jax
import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or the GPU machine
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from sbjax import models, ops, training
from sbjax.data import mqrar
from sbjax.nn import softmax
from sbjax.parallel import batch_sharding, make_mesh

SWEEP_AXES = ("attentions", "seeds", "d_model", "num_heads", "seq_len", "num_keys")
SUMMARY, PLOT = "summary.json", "mqrar.png"
# Independent NumPy streams per purpose, so eval sequences never come from the training stream.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def runs(config: ml_collections.ConfigDict) -> list[dict]:
  """One dict per combination of the sweep axes: attention, seed, d_model, num_heads, seq_len,
  num_keys."""
  for axis in SWEEP_AXES:
    if not config[axis]:
      raise ValueError(f"config.{axis} must be a non-empty tuple, got {config[axis]!r}.")
  names = ("attention", "seed", "d_model", "num_heads", "seq_len", "num_keys")
  return [dict(zip(names, values))
          for values in itertools.product(*(config[axis] for axis in SWEEP_AXES))]


def run_name(run: dict) -> str:
  return ("{attention}-D{d_model}-N{num_heads}-T{seq_len}-K{num_keys}-seed{seed}".format(**run))


def make_batch(config, run: dict, rng: np.random.Generator, seq_len: int) -> dict:
  """An MQRAR batch as the training library's dict of ``[B, T]`` arrays."""
  batch = mqrar.make_batch(rng, batch_size=config.batch_size, seq_len=seq_len,
                           vocab_size=config.vocab_size, num_keys=run["num_keys"],
                           reassign_prob=config.reassign_prob)
  return {"inputs": batch.inputs, "targets": batch.targets, "loss_mask": batch.loss_mask}


def train_and_score(config, run: dict, workdir: str) -> list[dict]:
  """Trains one run and returns its summary records, one per eval length."""
  lm_config = models.LMConfig(
      vocab_size=config.vocab_size, num_layers=config.num_layers, d_model=run["d_model"],
      num_heads=run["num_heads"], mlp_dim=config.mlp_ratio * run["d_model"],
      attention=run["attention"], implementation=config.implementation,
      softmax_implementation=config.softmax_implementation)
  train_config = training.TrainConfig(
      num_steps=config.num_steps, learning_rate=config.learning_rate,
      warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      progress_bar=config.progress_bar)
  mesh = make_mesh(*train_config.mesh_shape)
  with jax.set_mesh(mesh):
    model = models.DecoderLM(lm_config, rngs=nnx.Rngs(run["seed"]))

  def batches(step):  # a function of the step, so a resumed run sees the same data
    rng = np.random.default_rng((run["seed"], _TRAIN_STREAM, step))
    return make_batch(config, run, rng, run["seq_len"])

  start = time.perf_counter()
  result = training.train(model, train_config, batches, workdir, mesh=mesh)
  train_seconds = time.perf_counter() - start

  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  params = result.state.params
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  eval_step = training.make_eval_step(graphdef, rest, mesh, param_shardings)
  last = result.metrics[-1] if result.metrics else {}  # empty when resumed at the last step
  records = []
  for seq_len in config.eval_seq_lens:
    rng = np.random.default_rng((run["seed"], _EVAL_STREAM, seq_len))
    eval_batches = [make_batch(config, run, rng, seq_len) for _ in range(config.eval_batches)]
    scores = training.evaluate(eval_step, params, eval_batches, batch_sharding(mesh))
    records.append({
        **run, "accuracy": scores["accuracy"], "eval_loss": scores["loss"],
        "queries": int(scores["tokens"]), "seq_len": seq_len, "train_seq_len": run["seq_len"],
        "num_layers": config.num_layers, "vocab_size": config.vocab_size,
        "reassign_prob": config.reassign_prob, "num_steps": config.num_steps,
        "params": models.count_params(model), "train_seconds": round(train_seconds, 2),
        "train_loss": last.get("loss"), "train_accuracy": last.get("accuracy"),
        "implementation": _implementation(config, run["attention"]),
        "backend": jax.default_backend()})
    logging.info("%s: accuracy %.3f at T=%d", run_name(run), scores["accuracy"], seq_len)
  return records


def _implementation(config, attention: str) -> str:
  """The attention implementation a run used, with ``None`` resolved."""
  if attention == "stickbreaking":
    return config.implementation or ops.default_implementation()
  return config.softmax_implementation or softmax.default_softmax_implementation()


def _mean_by(records, x):
  """{attention: (xs, mean accuracies)} over all records, grouped by attention and ``x``."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[r["attention"], r[x]].append(r["accuracy"])
  lines = collections.defaultdict(list)
  for (attention, value), accs in sorted(groups.items()):
    lines[attention].append((value, float(np.mean(accs))))
  return {a: tuple(zip(*points)) for a, points in lines.items()}


def plot(records: list[dict], path: str) -> None:
  """Accuracy against difficulty, one line per attention: number of keys at the trained length
  (left), eval length (right); each line averages the other axes and the seeds, faint dots are
  single runs."""
  at_train_len = [r for r in records if r["seq_len"] == r["train_seq_len"]]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  keys_label = "keys per sequence at the trained length\n(fewer keys: more stale values per key)"
  for ax, data, x, label in ((axes[0], at_train_len, "num_keys", keys_label),
                             (axes[1], records, "seq_len", "eval sequence length T")):
    for attention, (xs, accs) in sorted(_mean_by(data, x).items()):
      line, = ax.plot(xs, accs, marker="o", label=attention)
      # Single runs, faint: a mean of 0.4 may be one seed at 1.0 and two that never learned.
      runs_of = [r for r in data if r["attention"] == attention]
      ax.scatter([r[x] for r in runs_of], [r["accuracy"] for r in runs_of], s=12,
                 color=line.get_color(), alpha=0.35)
    ax.set_xlabel(label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r[x] for r in data}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("recall accuracy of the latest value")
  axes[0].set_ylim(0, 1.02)
  axes[0].legend()
  fig.suptitle("MQRAR: recall of the most recent assignment")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _write_json(path: str, records: list[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(records, f, indent=1)
  os.replace(tmp, path)  # a killed process never leaves a half-written summary


def merge(workdir: str) -> list[dict]:
  """Joins the summaries of ``workdir``'s subfolders (one per sweep process) into
  ``workdir/summary.json`` and ``workdir/mqrar.png``; returns the records."""
  records = []
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name, SUMMARY)
    if os.path.exists(path):
      with open(path) as f:
        records += json.load(f)
  _write_json(os.path.join(workdir, SUMMARY), records)
  if records:
    plot(records, os.path.join(workdir, PLOT))
  return records


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs every combination of the sweep axes; returns all summary records.

  Writes ``workdir/summary.json`` and ``workdir/mqrar.png`` after each run; runs already in an
  existing summary are skipped.
  """
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, SUMMARY)
  records = []
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      records = json.load(f)
  done = {run_name(r) for r in records}
  todo = [run for run in runs(config) if run_name(run) not in done]
  logging.info("MQRAR: %d runs to do, %d already in %s", len(todo), len(done), summary_path)
  for i, run in enumerate(todo):
    logging.info("run %d/%d: %s", i + 1, len(todo), run_name(run))
    records += train_and_score(config, run, os.path.join(workdir, "runs", run_name(run)))
    _write_json(summary_path, records)
    plot(records, os.path.join(workdir, PLOT))
  return records
