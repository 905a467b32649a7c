"""MQRAR experiment: train a decoder LM per attention and setting, score recall, plot, report.

``train_and_evaluate(config, workdir)`` runs the product of the config's sweep axes (attentions,
seeds, d_model, num_heads, seq_len, num_keys, learning_rates), one run after another (the CPU
default; ``config.vmap=True`` trains them in vmapped groups instead: ``mqrar_sweep_lib``). A run is named by its sweep values and a hash of
its whole effective config (``run_config``): ``workdir/runs/<name>-<hash>/`` holds its
``config.json``, checkpoints, TensorBoard logs, ``metrics.jsonl`` and, once finished,
``result.json``. A run trains ``sbjax.models.DecoderLM`` with ``sbjax.training.train`` on MQRAR
batches drawn on the fly, then scores accuracy at every key query of held-out sequences at each
``eval_seq_lens`` length. After each run ``summary.json`` (one record per run and eval length, the
config's runs only) and ``mqrar.png`` are rewritten, so an interrupted sweep keeps what finished.
A rerun reuses the runs whose whole config matches and says which runs in the workdir were made
with another config, and how it differs; those are kept, never reused nor resumed.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import json
import os
import textwrap
import time

import jax
import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or the GPU machine
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

import mqrar_report
import sbjax
from sbjax import models, nn, training
from sbjax.data import mqrar
from sbjax.parallel import batch_sharding, make_mesh

SWEEP_AXES = (
    "attentions", "seeds", "d_model", "num_heads", "seq_len", "num_keys", "learning_rates")
RUN_FIELDS = ("attention", "seed", "d_model", "num_heads", "seq_len", "num_keys",
              "learning_rate")  # one per axis
SUMMARY, PLOT, RUNS = "summary.json", "mqrar.png", "runs"
RUN_CONFIG, RUN_RESULT = "config.json", "result.json"
# Config fields that change how a run is shown, not what it computes: left out of its identity.
_DISPLAY_FIELDS = ("progress_bar",)
# Independent NumPy streams per purpose, so eval sequences never come from the training stream.
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def runs(config: ml_collections.ConfigDict) -> list[dict]:
  """One dict per combination of the sweep axes, keyed by ``RUN_FIELDS``."""
  for axis in SWEEP_AXES:
    if not config[axis]:
      raise ValueError(f"config.{axis} must be a non-empty tuple, got {config[axis]!r}.")
  return [dict(zip(RUN_FIELDS, values))
          for values in itertools.product(*(config[axis] for axis in SWEEP_AXES))]


def run_config(config: ml_collections.ConfigDict, run: dict) -> dict:
  """A run's whole effective config, as JSON values: every config field, each sweep axis replaced
  by the run's value and the attention implementations resolved (``None`` depends on the
  machine); display-only fields left out."""
  values = config.to_dict()
  for axis, field in zip(SWEEP_AXES, RUN_FIELDS):
    del values[axis]
    values[field] = run[field]
  for field in _DISPLAY_FIELDS:
    values.pop(field, None)
  values["implementation"] = config.implementation or sbjax.default_implementation()
  values["softmax_implementation"] = (config.softmax_implementation
                                      or nn.default_softmax_implementation())
  return json.loads(json.dumps(values))  # tuples become lists, as in a saved config


def config_hash(run_cfg: dict) -> str:
  return hashlib.sha256(json.dumps(run_cfg, sort_keys=True).encode()).hexdigest()[:10]


def run_name(run: dict) -> str:
  """The sweep point of a run (its config fields or a summary record)."""
  train_len = run.get("train_seq_len", run["seq_len"])  # records hold the eval length in seq_len
  return (f"{run['attention']}-D{run['d_model']}-N{run['num_heads']}-T{train_len}"
          f"-K{run['num_keys']}-lr{run['learning_rate']:g}-seed{run['seed']}")


def run_dir_name(run_cfg: dict) -> str:
  return f"{run_name(run_cfg)}-{config_hash(run_cfg)}"


def differences(old: dict, new: dict) -> list[str]:
  """``"field: old -> new"`` for every field where two run configs differ."""
  missing = "(unset)"
  return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
          for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


def make_batch(run_cfg: dict, rng: np.random.Generator, seq_len: int) -> dict:
  """An MQRAR batch as the training library's dict of ``[B, T]`` arrays."""
  batch = mqrar.make_batch(rng, batch_size=run_cfg["batch_size"], seq_len=seq_len,
                           vocab_size=run_cfg["vocab_size"], num_keys=run_cfg["num_keys"],
                           reassign_prob=run_cfg["reassign_prob"])
  return {"inputs": batch.inputs, "targets": batch.targets, "loss_mask": batch.loss_mask}


@functools.lru_cache(maxsize=None)
def baselines(vocab_size: int, num_keys: int, seq_len: int, reassign_prob: float
              ) -> tuple[float, float]:
  """Reference accuracies of a setting: ``(chance, key_match_no_recency)``.

  ``chance`` guesses uniformly among the ``V/2`` values. ``key_match_no_recency`` finds the
  queried key but guesses uniformly among the distinct values it held before: the level of a
  model that cannot tell its most recent assignment from older ones. Estimated on 64 fixed
  sequences.
  """
  batch = mqrar.make_batch(np.random.default_rng(0), batch_size=64, seq_len=seq_len,
                           vocab_size=vocab_size, num_keys=num_keys, reassign_prob=reassign_prob)
  scores = []
  for row in batch.inputs:
    held = collections.defaultdict(set)
    for key, value in zip(row[0::2].tolist(), row[1::2].tolist()):
      if held[key]:
        scores.append(1 / len(held[key]))
      held[key].add(value)
  return 2 / vocab_size, float(np.mean(scores))


def train_and_score(run_cfg: dict, workdir: str, progress_bar: bool = True) -> dict:
  """Trains one run in ``workdir`` (resuming its checkpoints) and scores it.

  Returns:
    ``{"config": run_cfg, "records": [one per eval length], "curve": {"step", "loss",
    "accuracy"} of the logged training metrics}``.
  """
  lm_config = models.LMConfig(
      vocab_size=run_cfg["vocab_size"], num_layers=run_cfg["num_layers"],
      d_model=run_cfg["d_model"], num_heads=run_cfg["num_heads"],
      mlp_dim=run_cfg["mlp_ratio"] * run_cfg["d_model"], attention=run_cfg["attention"],
      implementation=run_cfg["implementation"],
      softmax_implementation=run_cfg["softmax_implementation"], dtype=run_cfg["dtype"])
  train_config = training.TrainConfig(
      num_steps=run_cfg["num_steps"], learning_rate=run_cfg["learning_rate"],
      warmup_steps=run_cfg["warmup_steps"], weight_decay=run_cfg["weight_decay"],
      log_every=run_cfg["log_every"], checkpoint_every=run_cfg["checkpoint_every"],
      progress_bar=progress_bar)
  mesh = make_mesh(*train_config.mesh_shape)
  with jax.set_mesh(mesh):
    model = models.DecoderLM(lm_config, rngs=nnx.Rngs(run_cfg["seed"]))

  # Under jax.distributed each process supplies its rows of every global batch (all of them in
  # a single-process run); every process draws the same global batch from the same seed.
  rows = training.process_batch_rows(run_cfg["batch_size"], mesh)
  local = lambda batch: {name: x[rows] for name, x in batch.items()}

  def batches(step):  # a function of the step, so a resumed run sees the same data
    rng = np.random.default_rng((run_cfg["seed"], _TRAIN_STREAM, step))
    return local(make_batch(run_cfg, rng, run_cfg["seq_len"]))

  start = time.perf_counter()
  result = training.train(model, train_config, batches, workdir, mesh=mesh)
  train_seconds = time.perf_counter() - start

  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  params = result.state.params
  eval_step = training.make_eval_step(graphdef, rest, mesh,
                                      jax.tree.map(lambda x: x.sharding, params))
  last = result.metrics[-1]
  records = []
  for seq_len in run_cfg["eval_seq_lens"]:
    rng = np.random.default_rng((run_cfg["seed"], _EVAL_STREAM, seq_len))
    eval_batches = [local(make_batch(run_cfg, rng, seq_len))
                    for _ in range(run_cfg["eval_batches"])]
    scores = training.evaluate(eval_step, params, eval_batches, batch_sharding(mesh))
    chance, key_match = baselines(run_cfg["vocab_size"], run_cfg["num_keys"], seq_len,
                                  run_cfg["reassign_prob"])
    records.append({
        **{field: run_cfg[field] for field in RUN_FIELDS},
        "accuracy": scores["accuracy"], "eval_loss": scores["loss"],
        "queries": int(scores["tokens"]), "seq_len": seq_len, "train_seq_len": run_cfg["seq_len"],
        "chance": chance, "key_match_no_recency": key_match,
        "num_layers": run_cfg["num_layers"], "vocab_size": run_cfg["vocab_size"],
        "reassign_prob": run_cfg["reassign_prob"], "num_steps": run_cfg["num_steps"],
        "learning_rate": run_cfg["learning_rate"], "params": models.count_params(model),
        "train_seconds": round(train_seconds, 2), "train_loss": last["loss"],
        "train_accuracy": last["accuracy"],
        "implementation": run_cfg["implementation" if run_cfg["attention"] == "stickbreaking"
                                  else "softmax_implementation"],
        "backend": jax.default_backend(), "run": run_dir_name(run_cfg),
        "config_hash": config_hash(run_cfg)})
    logging.info("%s: accuracy %.3f at T=%d", run_name(run_cfg), scores["accuracy"], seq_len)
  curve = {k: [m[k] for m in result.metrics] for k in ("step", "loss", "accuracy")}
  return {"config": run_cfg, "records": records, "curve": curve}


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)  # a killed process never leaves a half-written file


def claim_run_dir(run_dir: str, run_cfg: dict) -> dict | None:
  """Makes ``run_dir`` the run's (writing its config.json); returns its finished result, if any.

  A directory whose config.json differs (a hash collision, or a hand-edited file) is refused, so
  checkpoints are never resumed under another config.
  """
  path = os.path.join(run_dir, RUN_CONFIG)
  if os.path.exists(path):
    saved = read_json(path)
    if saved != run_cfg:
      raise ValueError(f"{run_dir} holds a run of another config "
                       f"({'; '.join(differences(saved, run_cfg))}); move it away or use another "
                       f"workdir.")
  elif training.is_primary():  # under jax.distributed, process 0 writes for all
    os.makedirs(run_dir, exist_ok=True)
    write_json(path, run_cfg)
  result_path = os.path.join(run_dir, RUN_RESULT)
  return read_json(result_path) if os.path.exists(result_path) else None


def _report_other_configs(workdir: str, planned: list[dict]) -> None:
  """Logs the runs in ``workdir`` made with another config and how they differ from this one."""
  names = {run_dir_name(c) for c in planned}
  by_point = {run_name(c): c for c in planned}
  runs_dir = os.path.join(workdir, RUNS)
  others = sorted(d for d in (os.listdir(runs_dir) if os.path.isdir(runs_dir) else [])
                  if d not in names)
  shown = 5  # a sweep's worth of runs would fill the screen
  if len(others) > shown:
    logging.warning("%d runs in %s were made with other configs and are not reused; the first "
                    "%d:", len(others), runs_dir, shown)
  for d in others[:shown]:
    path = os.path.join(runs_dir, d, RUN_CONFIG)
    if not os.path.exists(path):
      logging.warning("%s: a run of an older sbjax (no %s); not reused.", d, RUN_CONFIG)
      continue
    saved = read_json(path)
    new = by_point.get(run_name(saved), planned[0])
    logging.warning("%s: made with another config, kept but not reused (differs from %s in %s).",
                    d, run_dir_name(new), "; ".join(differences(saved, new)))
  summary_path = os.path.join(workdir, SUMMARY)
  if os.path.exists(summary_path):
    stale = {r.get("run", run_name(r)) for r in read_json(summary_path)} - names
    if stale:
      logging.warning("%s listed %d runs of another config; it now lists this config's runs "
                      "only (the others stay in %s).", summary_path, len(stale), runs_dir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs every combination of the sweep axes not already finished; returns all summary records.

  Writes ``workdir/summary.json`` and ``workdir/mqrar.png`` after each run.
  """
  os.makedirs(workdir, exist_ok=True)
  planned = [run_config(config, run) for run in runs(config)]
  _report_other_configs(workdir, planned)
  results = {}
  for run_cfg in planned:
    result = claim_run_dir(os.path.join(workdir, RUNS, run_dir_name(run_cfg)), run_cfg)
    if result is not None:
      results[run_dir_name(run_cfg)] = result
  todo = [c for c in planned if run_dir_name(c) not in results]
  logging.info("MQRAR: %d runs, %d to train, %d already finished in %s.", len(planned),
               len(todo), len(planned) - len(todo), os.path.join(workdir, RUNS))
  _write_summary(workdir, planned, results)  # drops the records of other configs at once
  for i, run_cfg in enumerate(todo):
    name = run_dir_name(run_cfg)
    logging.info("run %d/%d: %s", i + 1, len(todo), name)
    run_dir = os.path.join(workdir, RUNS, name)
    results[name] = train_and_score(run_cfg, run_dir, config.progress_bar)
    if training.is_primary():
      write_json(os.path.join(run_dir, RUN_RESULT), results[name])
    _write_summary(workdir, planned, results)
  return [r for c in planned for r in results[run_dir_name(c)]["records"]]


def _write_summary(workdir: str, planned: list[dict], results: dict) -> None:
  if not training.is_primary():
    return
  done = [results[run_dir_name(c)] for c in planned if run_dir_name(c) in results]
  records = [r for result in done for r in result["records"]]
  write_json(os.path.join(workdir, SUMMARY), records)
  if records:
    plot(records, os.path.join(workdir, PLOT),
         {result["records"][0]["run"]: result["curve"] for result in done})
  elif os.path.exists(os.path.join(workdir, PLOT)):
    os.remove(os.path.join(workdir, PLOT))  # it showed runs of another config


def replot(directory: str) -> None:
  """Redraws ``directory/mqrar.png`` from ``directory/summary.json`` (and the training curves of
  ``directory/runs``, where there are any)."""
  plot(read_json(os.path.join(directory, SUMMARY)), os.path.join(directory, PLOT),
       _curves(directory))


def _curves(workdir: str) -> dict:
  runs_dir = os.path.join(workdir, RUNS)
  curves = {}
  for d in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    path = os.path.join(runs_dir, d, RUN_RESULT)
    if os.path.exists(path):
      curves[d] = read_json(path)["curve"]
  return curves


# Reporting: the table the main job ends on, and the plot.

_WIDTH = 100  # columns of the report's prose
_COLORS = {"stickbreaking": "C2", "softmax_rope": "C1", "softmax_nope": "C0"}
_MARKERS = "os^Dv<>p"


def _groups(records: list[dict]) -> list[str]:
  """The sweep fields, besides attention and seed, that take several values in ``records``."""
  return [f for f in ("d_model", "num_heads", "train_seq_len", "num_keys")
          if len({r[f] for r in records}) > 1]


def _baseline(r: dict) -> tuple[float, float]:
  return baselines(r["vocab_size"], r["num_keys"], r["seq_len"], r["reassign_prob"])


def report(records: list[dict], workdir: str) -> str:
  """The main job's last screen: accuracy per attention (and swept setting) and eval length,
  what the numbers mean, and where the outputs are."""
  lrs = sorted({r.get("learning_rate") for r in records}, key=str)
  if len(lrs) > 1:  # each setting at its best learning rate
    records = mqrar_report.best_records(records)
  varied = _groups(records)
  lens = sorted({r["seq_len"] for r in records})
  trained = sorted({r["train_seq_len"] for r in records})
  steps = sorted({r["num_steps"] for r in records})
  vocab = sorted({r["vocab_size"] for r in records})
  cells = collections.defaultdict(list)
  for r in records:
    cells[tuple(r[f] for f in ["attention", *varied]), r["seq_len"]].append(r["accuracy"])
  rows = sorted({row for row, _ in cells}, key=lambda row: (
      list(_COLORS).index(row[0]) if row[0] in _COLORS else 9, row))
  label = lambda row: " ".join([row[0], *(f"{f}={v}" for f, v in zip(varied, row[1:]))])
  width = max(len(label(row)) for row in rows) + 2
  width = max(width, len("key match, no recency num_keys=000") + 2 if "num_keys" in varied
              else len("key match, no recency") + 2)
  header = "".join(f"{f'T={t}' + ('*' if t in trained else ''):>9}" for t in lens)
  seeds = len({r["seed"] for r in records})
  lines = [f"MQRAR accuracy: share of key queries answered with the key's latest value, on "
           f"held-out sequences{f' (mean of {seeds} seeds)' if seeds > 1 else ''}"
           f"{f', at the best of {len(lrs)} learning rates' if len(lrs) > 1 else ''}.",
           f"{'':{width}}{header}"]
  lines[0] = textwrap.fill(lines[0], _WIDTH)
  # What every row shares, so the screen says what was trained.
  fixed = []
  for name, field in (("layers", "num_layers"), ("width", "d_model"), ("heads", "num_heads"),
                      ("keys", "num_keys"), ("lr", "learning_rate"), ("seed", "seed")):
    values = {r.get(field) for r in records}
    if len(values) == 1 and None not in values:
      fixed.append(f"{name} {values.pop():g}")
  if fixed:
    lines.insert(1, "Setting: " + ", ".join(fixed) + ".")
  for row in rows:
    accs = (cells.get((row, t)) for t in lens)
    lines.append(f"{label(row):{width}}" + "".join(
        f"{np.mean(a):9.3f}" if a else f"{'-':>9}" for a in accs))
  # The reference levels depend on the number of keys and the length only.
  for keys in sorted({r["num_keys"] for r in records}):
    ref = {r["seq_len"]: _baseline(r)[1] for r in records if r["num_keys"] == keys}
    name = "key match, no recency" + (f" num_keys={keys}" if "num_keys" in varied else "")
    lines.append(f"{name:{width}}" + "".join(
        f"{ref[t]:9.3f}" if t in ref else f"{'-':>9}" for t in lens))
  lines += [
      textwrap.fill(
          f"* trained length ({steps[0] if len(steps) == 1 else steps} steps); longer T tests "
          f"length generalisation. Chance (a guess among the {vocab[0] // 2} values) is "
          f"{2 / vocab[0]:.3f}; \"key match, no recency\": a model that finds the key's earlier "
          f"values but picks one at random.", _WIDTH),
      "",
      f"Outputs in {workdir}:",
      f"  {SUMMARY:14}every run and eval length (accuracy, loss, config hash)",
      f"  {PLOT:14}accuracy vs eval length, training curves",
      f"  {RUNS + '/<run>/':14}per run: config.json, result.json, metrics.jsonl, checkpoints/, "
      f"tensorboard/",
      f"  TensorBoard:  tensorboard --logdir {os.path.join(workdir, RUNS)}"]
  return "\n".join(lines)


def _style(records, r, fields):
  """Colour by attention; marker and line style by the first of ``fields`` (the other swept
  fields a line is drawn for)."""
  color = _COLORS.get(r["attention"], "C3")
  if not fields:
    return dict(color=color, marker="o", linestyle="-")
  values = sorted({x[fields[0]] for x in records})
  i = values.index(r[fields[0]])
  return dict(color=color, marker=_MARKERS[i % len(_MARKERS)],
              linestyle=("-", "--", ":", "-.")[i % 4])


def plot(records: list[dict], path: str, curves: dict | None = None) -> None:
  """Accuracy against eval length (lines: mean over seeds, dots: single runs), with the trained
  length, chance and the "any earlier value" level marked; accuracy against the number of keys
  at the trained length when that is swept; training curves when ``curves`` (run name ->
  ``{"step", "accuracy"}``) are given."""
  varied = _groups(records)
  panels = ["length"] + (["keys"] if "num_keys" in varied else []) + (["curves"] if curves else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
  axes = dict(zip(panels, axes[0]))

  def lines(ax, data, x, fields):
    groups = collections.defaultdict(list)
    for r in data:
      groups[tuple(r[f] for f in ["attention", *fields])].append(r)
    order = lambda item: (list(_COLORS).index(item[0][0]) if item[0][0] in _COLORS else 9, item)
    for key, rs in sorted(groups.items(), key=order):
      by_x = collections.defaultdict(list)
      for r in rs:
        by_x[r[x]].append(r["accuracy"])
      xs = sorted(by_x)
      style = _style(records, rs[0], fields)
      label = " ".join([key[0], *(f"{f}={v}" for f, v in zip(fields, key[1:]))])
      ax.plot(xs, [np.mean(by_x[v]) for v in xs], label=label, **style)
      # Single runs, faint: a mean of 0.4 may be one seed at 1.0 and two that never learned.
      ax.scatter([r[x] for r in rs], [r["accuracy"] for r in rs], s=10, color=style["color"],
                 alpha=0.3)
    ax.set_xscale("log", base=2)
    ticks = sorted({r[x] for r in data})
    ax.set_xticks(ticks)
    ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)  # room for the trained-length mark at an end
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)

  def references(ax, data, x, key_match=True):
    """Chance (dashed) and the "key match, no recency" level (dotted, per number of keys)."""
    ax.axhline(_baseline(data[0])[0], color="gray", linestyle="--", linewidth=1, label="chance")
    # One line per number of keys against the length; one line across the numbers of keys.
    per = "num_keys" if x != "num_keys" else "seq_len"
    for value in sorted({r[per] for r in data}) if key_match else ():
      points = sorted({(r[x], _baseline(r)[1]) for r in data if r[per] == value})
      ax.plot(*zip(*points), color="gray", linestyle=":", linewidth=1.2,
              label="key match, no recency" if value == min(r[per] for r in data) else None)

  ax = axes["length"]
  lines(ax, records, "seq_len", varied)
  references(ax, records, "seq_len", key_match="num_keys" not in varied)  # else: clutter
  for t in sorted({r["train_seq_len"] for r in records}):
    ax.axvline(t, color="black", alpha=0.5, linewidth=1)
    ax.text(t, 0.5, "trained length ", rotation=90, fontsize=8, ha="right", va="center")
  ax.set_xlabel("eval sequence length T")
  ax.set_ylabel("recall accuracy of the latest value")
  ax.set_title("length generalisation")
  if "keys" in axes:
    ax = axes["keys"]
    at_train = [r for r in records if r["seq_len"] == r["train_seq_len"]]
    lines(ax, at_train, "num_keys", [f for f in varied if f != "num_keys"])
    references(ax, at_train, "num_keys")
    ax.set_xlabel("keys per sequence (fewer: more stale values per key)")
    ax.set_title("at the trained length")
  if "curves" in axes:
    ax = axes["curves"]
    by_run = {r["run"]: r for r in records if "run" in r}
    labelled = set()
    rank = lambda run: (list(_COLORS).index(by_run[run]["attention"])
                        if by_run[run]["attention"] in _COLORS else 9, run)
    for run in sorted((run for run in curves if run in by_run), key=rank):
      r = by_run[run]
      label = " ".join([r["attention"], *(f"{f}={r[f]}" for f in varied[:1])])
      ax.plot(curves[run]["step"], curves[run]["accuracy"], linewidth=1, alpha=0.8,
              label=None if label in labelled else label,
              **{k: v for k, v in _style(records, r, varied[:1]).items() if k != "marker"})
      labelled.add(label)
    ax.axhline(_baseline(records[0])[0], color="gray", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_xlabel("training step")
    ax.set_title("training accuracy (logged intervals)")
  for name in axes:
    if name in axes:
      axes[name].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
  fig.suptitle("MQRAR: recall of each key's most recent value")
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")  # the legends sit below the panels
  plt.close(fig)
