"""The MQRAR sweep's report: the best learning rate per cell, tables, and the plots.

A *cell* is (attention, d_model, num_heads, train_seq_len, num_keys). As in Zoology, each cell is
reported at its best learning rate: the one with the highest mean accuracy over seeds at the
trained length (ties: the lower mean eval loss there), then that learning rate's mean and spread
over seeds at every eval length. The choice uses the same held-out sequences the accuracy is
reported on, as Zoology's does.

    best_records(records) -> the records of each cell's best learning rate
    cell_rows(records) -> one row per cell: best lr, mean/std/solved per eval length
    markdown_table(rows, recency_rows=None) -> str      (the README's table)
    write_outputs(workdir, results, config)             (summary.json, tables, plots)
"""

from __future__ import annotations

import collections
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or the GPU machine
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

CELL = ("attention", "d_model", "num_heads", "train_seq_len", "num_keys")
SOLVED = 0.9  # a run "solved" its cell at this accuracy
ATTENTION_ORDER = ("stickbreaking", "softmax_rope", "softmax_nope")
COLORS = {"stickbreaking": "C2", "softmax_rope": "C1", "softmax_nope": "C0"}
OUTPUTS = {"summary": "summary.json", "cells": "cells.json", "table": "table.md",
           "curves": "curves.json", "recency": "recency.json", "keys": "mqrar_keys.png",
           "lengths": "mqrar_lengths.png", "training": "mqrar_curves.png",
           "recency_plot": "mqrar_recency.png", "maps": "mqrar_maps.png"}


def _cell(r: dict) -> tuple:
  return tuple(r[f] for f in CELL)


def _order(cell: tuple) -> tuple:
  rank = ATTENTION_ORDER.index(cell[0]) if cell[0] in ATTENTION_ORDER else len(ATTENTION_ORDER)
  return (rank, *cell[1:])


def best_learning_rates(records: list[dict]) -> dict[tuple, float]:
  """Each cell's best learning rate: highest mean accuracy over seeds at the trained length, ties
  broken by the lower mean eval loss there."""
  by = collections.defaultdict(list)
  for r in records:
    if r["seq_len"] == r["train_seq_len"]:
      by[_cell(r), r["learning_rate"]].append(r)
  score = {key: (np.mean([r["accuracy"] for r in rs]), -np.mean([r["eval_loss"] for r in rs]))
           for key, rs in by.items()}
  best = {}
  for (cell, lr), s in sorted(score.items(), key=lambda item: item[0][1]):
    if cell not in best or s > score[cell, best[cell]]:
      best[cell] = lr
  return best


def best_records(records: list[dict]) -> list[dict]:
  """The records (every seed and eval length) of each cell's best learning rate."""
  best = best_learning_rates(records)
  return [r for r in records if best.get(_cell(r)) == r["learning_rate"]]


def cell_rows(records: list[dict]) -> list[dict]:
  """One row per cell, in attention order: its cell fields, ``learning_rate`` (the best),
  ``learning_rates`` (all tried), and per eval length ``mean``, ``std`` (over seeds), ``seeds``,
  ``solved`` (seeds at >= 0.9) and ``key_match`` (the no-recency level)."""
  tried = collections.defaultdict(set)
  for r in records:
    tried[_cell(r)].add(r["learning_rate"])
  cells = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in best_records(records):
    cells[_cell(r)][r["seq_len"]].append(r)
  rows = []
  for cell in sorted(cells, key=_order):
    by_len = cells[cell]
    first = next(iter(by_len.values()))[0]
    rows.append({
        **dict(zip(CELL, cell)), "learning_rate": first["learning_rate"],
        "learning_rates": sorted(tried[cell]),
        "lengths": {str(t): {"mean": float(np.mean([r["accuracy"] for r in rs])),
                             "std": float(np.std([r["accuracy"] for r in rs])),
                             "seeds": len(rs), "solved": sum(r["accuracy"] >= SOLVED for r in rs),
                             "key_match": rs[0]["key_match_no_recency"], "chance": rs[0]["chance"]}
                    for t, rs in sorted(by_len.items())}})
  return rows


def retrieval_head(recency: dict) -> tuple[int, int]:
  """``(layer, head)`` with the most key-match weight per query in one run's recency sums."""
  match = (np.asarray(recency["recent"]) + np.asarray(recency["older"])) / max(recency["queries"], 1)
  return tuple(int(i) for i in np.unravel_index(np.argmax(match), match.shape))


def recency_rows(entries: list[dict], records: list[dict]) -> dict[tuple, dict]:
  """Per cell, at its best learning rate: the retrieval head's ``share`` (weight on the latest
  assignment over the key-match weight), ``share_init`` (the same head at initialisation) and
  ``match`` (key-match weight per query), mean over seeds, and the ``uniform`` share (weight
  spread evenly over the key's assignments); ``entries`` are runs' recency sums with their run
  fields."""
  best = best_learning_rates(records)
  by = collections.defaultdict(list)
  for e in entries:
    cell = tuple(e[f] for f in CELL)
    if best.get(cell) == e["learning_rate"]:
      layer, head = retrieval_head(e)
      share = lambda s: s["recent"][layer][head] / max(
          s["recent"][layer][head] + s["older"][layer][head], 1e-30)
      by[cell].append({"share": share(e), "share_init": share(e["init"]) if "init" in e else np.nan,
                       "match": (e["recent"][layer][head] + e["older"][layer][head])
                                / max(e["queries"], 1),
                       "uniform": e["uniform"] / max(e["queries"], 1), "layer": layer,
                       "head": head})
  keys = ("share", "share_init", "match", "uniform")
  return {cell: {k: float(np.mean([x[k] for x in xs])) for k in keys}
          | {"heads": [(x["layer"], x["head"]) for x in xs]} for cell, xs in by.items()}


def markdown_table(rows: list[dict], recency: dict | None = None) -> str:
  """The README's table: one row per cell at its best learning rate, mean ± std over seeds."""
  lengths = sorted({int(t) for row in rows for t in row["lengths"]})
  trained = rows[0]["train_seq_len"] if rows else None
  head = ["attention", "width", "keys", "best lr",
          *(f"T={t}" + (" (trained)" if t == trained else "") for t in lengths),
          "solved at T", *(["recency share", "key-match weight"] if recency else [])]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
  for row in rows:
    cells = [row["attention"], str(row["d_model"]), str(row["num_keys"]),
             f"{row['learning_rate']:g}"]
    for t in lengths:
      x = row["lengths"].get(str(t))
      cells.append(f"{x['mean']:.3f} ± {x['std']:.3f}" if x else "-")
    x = row["lengths"][str(row["train_seq_len"])]
    cells.append(f"{x['solved']}/{x['seeds']}")
    if recency:
      rec = recency.get(tuple(row[f] for f in CELL))
      cells += ([f"{rec['share']:.2f} (init {rec['share_init']:.2f}, even {rec['uniform']:.2f})",
                 f"{rec['match']:.2f}"] if rec else ["-", "-"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def console_table(rows: list[dict]) -> str:
  """The rows as fixed-width text: best lr, mean ± std over seeds per eval length, solved."""
  lengths = sorted({int(t) for row in rows for t in row["lengths"]})
  trained = {row["train_seq_len"] for row in rows}
  lines = [f"{'attention':14}{'D':>4}{'keys':>5}{'lr':>7}" + "".join(
      f"{'T=' + str(t) + ('*' if t in trained else ''):>14}" for t in lengths) + "  solved"]
  for row in rows:
    x = row["lengths"][str(row["train_seq_len"])]
    lines.append(f"{row['attention']:14}{row['d_model']:4}{row['num_keys']:5}"
                 f"{row['learning_rate']:7.0e}" + "".join(
                     f"{row['lengths'][str(t)]['mean']:8.3f}±{row['lengths'][str(t)]['std']:.3f}"
                     if str(t) in row["lengths"] else f"{'-':>14}" for t in lengths)
                 + f"  {x['solved']}/{x['seeds']}")
  return "\n".join(lines)


def report(records: list[dict], workdir: str) -> str:
  """The sweep's last screen: the table, what its numbers mean, and where the outputs are."""
  rows = cell_rows(records)
  if not rows:
    return f"No finished runs in {workdir}."
  lrs = sorted({lr for row in rows for lr in row["learning_rates"]})
  seeds = max(x["seeds"] for row in rows for x in row["lengths"].values())
  row = rows[0]
  lines = [
      "MQRAR: share of key queries answered with the key's latest value, on held-out sequences.",
      f"Each row (attention, width D, keys) at its best of {len(lrs)} learning rates "
      f"({', '.join(f'{lr:g}' for lr in lrs)}; chosen by mean",
      f"accuracy at the trained length T*), mean±std over {seeds} seeds; solved: seeds at >= "
      f"{SOLVED} at T*.", "", console_table(rows), "",
      f"Chance is {row['lengths'][str(row['train_seq_len'])]['chance']:.3f}; a model that finds "
      "the key but not its latest value scores about 1/(assignments per key).",
      f"Outputs in {workdir}: {OUTPUTS['table']} (with the recency share), "
      f"{OUTPUTS['summary']} (every run),",
      f"  {OUTPUTS['keys']}, {OUTPUTS['lengths']}, {OUTPUTS['training']}, "
      f"{OUTPUTS['recency_plot']}, {OUTPUTS['maps']}; groups/<group>/metrics.jsonl."]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots


def _grid(n_rows, n_cols, width=4.0, height=3.2):
  fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows),
                           squeeze=False, sharey=True)
  return fig, axes


def _log2_axis(ax, ticks):
  ax.set_xscale("log", base=2)
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.minorticks_off()
  ax.grid(alpha=0.3)


def _attentions(rows):
  return sorted({r["attention"] for r in rows},
                key=lambda a: ATTENTION_ORDER.index(a) if a in ATTENTION_ORDER else 9)


def plot_keys(rows: list[dict], records: list[dict], path: str) -> None:
  """The Zoology figure: accuracy against the number of keys, one panel per width, a line per
  attention (mean over seeds at the best learning rate, dots: seeds); top row at the trained
  length, bottom row at the longest eval length."""
  widths = sorted({r["d_model"] for r in rows})
  keys = sorted({r["num_keys"] for r in rows})
  longest = max(int(t) for r in rows for t in r["lengths"])
  lengths = [("trained", None), (f"T={longest}", longest)]
  best = best_records(records)
  fig, axes = _grid(len(lengths), len(widths))
  for i, (label, length) in enumerate(lengths):
    for j, width in enumerate(widths):
      ax = axes[i, j]
      for attention in _attentions(rows):
        sel = [r for r in rows if r["attention"] == attention and r["d_model"] == width]
        t_of = lambda r: str(length or r["train_seq_len"])
        sel = [r for r in sel if t_of(r) in r["lengths"]]
        xs = [r["num_keys"] for r in sel]
        ax.errorbar(xs, [r["lengths"][t_of(r)]["mean"] for r in sel],
                    yerr=[r["lengths"][t_of(r)]["std"] for r in sel], marker="o", capsize=3,
                    color=COLORS.get(attention), label=attention)
        dots = [r for r in best if r["attention"] == attention and r["d_model"] == width
                and r["seq_len"] == (length or r["train_seq_len"])]
        ax.scatter([r["num_keys"] for r in dots], [r["accuracy"] for r in dots], s=10,
                   color=COLORS.get(attention), alpha=0.35)
      ref = sorted({(r["num_keys"], r["lengths"][str(length or r["train_seq_len"])]["key_match"])
                    for r in rows if r["d_model"] == width
                    and str(length or r["train_seq_len"]) in r["lengths"]})
      if ref:
        ax.plot(*zip(*ref), color="gray", linestyle=":", label="key match, no recency")
      _log2_axis(ax, keys)
      ax.set_ylim(0, 1.03)
      ax.set_title(f"width {width}, {label}", fontsize=10)
      if i == len(lengths) - 1:
        ax.set_xlabel("keys per sequence")
    axes[i, 0].set_ylabel("recall of the latest value")
  axes[0, 0].legend(fontsize=8)
  fig.suptitle("MQRAR: accuracy at each cell's best learning rate (mean ± std over seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_lengths(rows: list[dict], path: str) -> None:
  """Accuracy against the eval length: a panel per (keys, width), a line per attention."""
  widths = sorted({r["d_model"] for r in rows})
  keys = sorted({r["num_keys"] for r in rows})
  fig, axes = _grid(len(keys), len(widths), height=2.8)
  for i, k in enumerate(keys):
    for j, width in enumerate(widths):
      ax = axes[i, j]
      for row in (r for r in rows if r["num_keys"] == k and r["d_model"] == width):
        ts = sorted(int(t) for t in row["lengths"])
        ax.errorbar(ts, [row["lengths"][str(t)]["mean"] for t in ts],
                    yerr=[row["lengths"][str(t)]["std"] for t in ts], marker="o", capsize=3,
                    color=COLORS.get(row["attention"]), label=row["attention"])
        ax.axvline(row["train_seq_len"], color="black", alpha=0.3)
        _log2_axis(ax, ts)
      ax.set_ylim(0, 1.03)
      ax.set_title(f"width {width}, {k} keys", fontsize=9)
    axes[i, 0].set_ylabel("accuracy")
  for ax in axes[-1]:
    ax.set_xlabel("eval length T (line: trained)")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("MQRAR: length generalisation at each cell's best learning rate")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def best_curves(results: list[dict], records: list[dict]) -> dict[str, dict]:
  """The training curves of each cell's best learning rate: ``"attention-D-keys" -> {"step",
  "accuracy" [S][seeds], "loss" [S][seeds], the cell fields}``."""
  best = best_learning_rates(records)
  curves = {}
  for result in results:
    g = result["config"]
    ms = [dict(zip(("num_keys", "learning_rate", "seed"), m)) for m in _members(g)]
    for k in g["num_keys"]:
      cell = (g["attention"], g["d_model"], g["num_heads"], g["seq_len"], k)
      idx = [i for i, m in enumerate(ms) if m["num_keys"] == k and m["learning_rate"] == best.get(cell)]
      if not idx:
        continue
      c = result["curves"]
      curves[f"{g['attention']}-D{g['d_model']}-N{g['num_heads']}-T{g['seq_len']}-K{k}"] = {
          **dict(zip(CELL, cell)), "learning_rate": best[cell], "step": c["step"],
          "accuracy": [[a[i] for i in idx] for a in c["accuracy"]],
          "loss": [[a[i] for i in idx] for a in c["loss"]]}
  return curves


def _members(group_cfg: dict):
  return [(k, lr, s) for k in group_cfg["num_keys"] for lr in group_cfg["learning_rates"]
          for s in group_cfg["seeds"]]


def plot_curves(curves: dict, path: str) -> None:
  """Training accuracy (per logged interval) of each cell's best learning rate: a panel per
  (keys, width), a line per seed, coloured by attention."""
  values = list(curves.values())
  widths = sorted({c["d_model"] for c in values})
  keys = sorted({c["num_keys"] for c in values})
  fig, axes = _grid(len(keys), len(widths), height=2.6)
  for c in values:
    ax = axes[keys.index(c["num_keys"]), widths.index(c["d_model"])]
    acc = np.asarray(c["accuracy"])  # [S, seeds]
    for s in range(acc.shape[1]):
      ax.plot(c["step"], acc[:, s], color=COLORS.get(c["attention"]), linewidth=1, alpha=0.8,
              label=f"{c['attention']} (lr {c['learning_rate']:g})" if s == 0 else None)
  for i, k in enumerate(keys):
    for j, width in enumerate(widths):
      axes[i, j].set_title(f"width {width}, {k} keys", fontsize=9)
      axes[i, j].set_ylim(0, 1.03)
      axes[i, j].grid(alpha=0.3)
      axes[i, j].legend(fontsize=6)
  for ax in axes[-1]:
    ax.set_xlabel("training step")
  fig.suptitle("MQRAR: training accuracy of each cell's best learning rate (one line per seed)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_recency(rows: list[dict], recency: dict, path: str) -> None:
  """The recency share of each run's retrieval head (the layer and head with the most weight on
  the queried key's earlier assignments) against the number of keys, one panel per width; the
  bottom row is that head's key-match weight. Dotted: the share of even spreading."""
  widths = sorted({r["d_model"] for r in rows})
  keys = sorted({r["num_keys"] for r in rows})
  fig, axes = _grid(2, len(widths))
  for j, width in enumerate(widths):
    for attention in _attentions(rows):
      cells = sorted((c, v) for c, v in recency.items() if c[0] == attention and c[1] == width)
      if not cells:
        continue
      xs = [c[4] for c, _ in cells]
      axes[0, j].plot(xs, [v["share"] for _, v in cells], "o-", color=COLORS.get(attention),
                      label=attention)
      axes[0, j].plot(xs, [v["share_init"] for _, v in cells], "x--", alpha=0.5,
                      color=COLORS.get(attention), label=f"{attention} at init")
      axes[1, j].plot(xs, [v["match"] for _, v in cells], "o-", color=COLORS.get(attention))
    uniform = sorted((c[4], v["uniform"]) for c, v in recency.items() if c[1] == width)
    if uniform:
      axes[0, j].plot(*zip(*dict(uniform).items()), color="gray", linestyle=":",
                      label="even over the key's assignments")
    axes[0, j].set_title(f"width {width}", fontsize=10)
    for ax in axes[:, j]:
      _log2_axis(ax, keys)
      ax.set_ylim(0, 1.03)
    axes[1, j].set_xlabel("keys per sequence")
  axes[0, 0].set_ylabel("share on the latest assignment")
  axes[1, 0].set_ylabel("key-match weight per query")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Where the retrieval head looks: the most recent assignment of the queried key "
               "vs older ones\n(best learning rate, mean over seeds; queries with >= 2 earlier "
               "assignments)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_maps(maps: dict, path: str) -> None:
  """Attention maps of one sequence: a row per attention, a column per (layer, head); crosses
  mark each query's most recent earlier assignment of its key (key and value positions).

  Args:
    maps: attention -> ``{"weights": [L, N, W, W], "tokens": [W]}``.
  """
  import mqrar_attention  # pylint: disable=g-import-not-at-top  # JAX only when maps are drawn
  names = [a for a in ATTENTION_ORDER if a in maps] + [a for a in maps if a not in ATTENTION_ORDER]
  layers, heads = np.asarray(maps[names[0]]["weights"]).shape[:2]
  fig, axes = plt.subplots(len(names), layers * heads, figsize=(3.2 * layers * heads,
                                                                3.2 * len(names)), squeeze=False)
  for i, name in enumerate(names):
    weights, tokens = np.asarray(maps[name]["weights"]), np.asarray(maps[name]["tokens"])
    recent, _, _ = mqrar_attention.assignment_masks(tokens[None])
    q, s = np.nonzero(np.asarray(recent[0]))  # [P, W]: query pair, source position
    for layer in range(layers):
      for head in range(heads):
        ax = axes[i, layer * heads + head]
        ax.imshow(weights[layer, head], cmap="viridis", vmin=0, vmax=1)
        ax.scatter(s, 2 * q, marker="x", s=8, color="red", linewidths=0.6)
        ax.set_title(f"{name} L{layer + 1} H{head + 1}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
  axes[0, 0].set_ylabel("query position")
  fig.suptitle(f"Attention weights on one sequence (first {weights.shape[-1]} positions; x: the "
               "latest earlier assignment of each query's key)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def write_outputs(workdir: str, results: list[dict], config) -> list[dict]:
  """Writes the sweep's outputs for the finished groups ``results`` (``mqrar_sweep_lib``'s):
  ``summary.json`` (every run and eval length), ``cells.json`` and ``table.md`` (best learning
  rate per cell), ``curves.json``, ``recency.json`` and the plots. Returns the cell rows."""
  records = [r for result in results for r in result["records"]]
  _write_json(os.path.join(workdir, OUTPUTS["summary"]), records)
  if not records:
    return []
  rows = cell_rows(records)
  entries = [{**{f: result["config"][f] for f in ("attention", "d_model", "num_heads")},
              "train_seq_len": result["config"]["seq_len"], **e}
             for result in results for e in result["recency"]]
  recency = recency_rows(entries, records)
  _write_json(os.path.join(workdir, OUTPUTS["cells"]), rows)
  _write_json(os.path.join(workdir, OUTPUTS["recency"]), entries)
  with open(os.path.join(workdir, OUTPUTS["table"]), "w") as f:
    f.write(markdown_table(rows, recency) + "\n")
  curves = best_curves(results, records)
  _write_json(os.path.join(workdir, OUTPUTS["curves"]), curves)
  plot_keys(rows, records, os.path.join(workdir, OUTPUTS["keys"]))
  plot_lengths(rows, os.path.join(workdir, OUTPUTS["lengths"]))
  plot_curves(curves, os.path.join(workdir, OUTPUTS["training"]))
  plot_recency(rows, recency, os.path.join(workdir, OUTPUTS["recency_plot"]))
  maps = _best_maps(workdir, results, records, config)
  if maps:
    plot_maps(maps, os.path.join(workdir, OUTPUTS["maps"]))
  return rows


def _best_maps(workdir: str, results: list[dict], records: list[dict], config) -> dict:
  """attention -> the maps of the best-lr, first-seed run of width ``config.map_d_model`` with
  ``config.map_num_keys`` keys (from each group's ``maps.npz``)."""
  best = best_learning_rates(records)
  maps = {}
  for result in results:
    g = result["config"]
    if g["d_model"] != config.map_d_model or config.map_num_keys not in g["num_keys"]:
      continue
    cell = (g["attention"], g["d_model"], g["num_heads"], g["seq_len"], config.map_num_keys)
    ms = _members(g)
    i = ms.index((config.map_num_keys, best[cell], min(g["seeds"])))
    name = os.path.basename(result["records"][0]["run"].rsplit("/", 1)[0])
    path = os.path.join(workdir, "groups", name, "maps.npz")
    if os.path.exists(path):
      with np.load(path) as f:
        maps[g["attention"]] = {"weights": f["weights"][i], "tokens": f["tokens"][i]}
  return maps
