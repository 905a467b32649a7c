"""Length extrapolation on real text: train at T, score every position of windows of 16 T.

``train_and_evaluate(config, workdir)``:

1. unpacks the ELTeC-eng archive (sha256-checked) and reads its book-level split;
2. trains (or loads) a byte-level BPE on the train books, tokenises every split into cached
   uint16 memmaps;
3. for each attention and seed, trains ``sbjax.models.DecoderLM`` at ``train_len`` with
   ``sbjax.training.train`` on ``TrainWindows`` batches (a pure function of the step, through
   ``grain`` when installed), with checkpoints, TensorBoard and a progress bar under
   ``workdir/runs/<attention>-seed<seed>-<hash>/``: the hash covers everything that shapes
   training, so a changed config never reuses another config's checkpoints or results;
4. scores the loss at every position 0..L-1 of every in-book validation window of
   ``L = eval_len_multiple * train_len`` (the head in chunks of positions, so ``L x V`` logits
   never exist at once), and at the end the test windows once;
5. writes ``summary.json`` (mean loss per position bin and perplexity of the first ``l`` tokens,
   with bootstrap intervals over books), ``position_loss.png``, ``ppl_context.png`` and
   ``train_loss.png``; each run's scores are cached in its run directory, so a rerun after a
   crash redoes only what was not finished.

With ``config.eval_text_dir`` set, nothing is trained: the finished runs of ``workdir`` score the
``.txt`` files of that directory, and the outputs go to ``workdir/eval_text/<dir name>/``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or the GPU machine
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

import sbjax
from sbjax import data, models, nn, training
from sbjax.parallel import batch_sharding, jit_under_mesh, make_mesh

SUMMARY = "summary.json"
PLOTS = {"position": "position_loss.png", "context": "ppl_context.png", "train": "train_loss.png"}
_BOOTSTRAP_STREAM = 2


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class TextData:
  """The tokenizer and the tokenised splits (``{"train", "validation", "test"}``)."""

  tokenizer: data.Tokenizer
  splits: dict[str, data.TokenizedCorpus]
  book_dir: str


def prepare_data(config) -> TextData:
  """Unpacks the corpus, trains or loads the tokenizer, tokenises the splits (all cached)."""
  archive = os.path.expanduser(config.corpus_archive)
  split_json = os.path.expanduser(config.split_json or os.path.join(os.path.dirname(archive),
                                                                   "split.json"))
  data_dir = os.path.expanduser(config.data_dir)
  book_dir = data.extract_corpus(archive, data_dir, expected_sha256=config.corpus_sha256 or None)
  split = data.load_split(split_json, book_dir)
  if config.max_train_books:
    split["train"] = split["train"][:config.max_train_books]
  documents = {s: data.read_documents(book_dir, names) for s, names in split.items()}
  # The tokenizer's file name hashes what it is trained from, so it is reused only for that.
  key = hashlib.sha256(json.dumps(
      [config.vocab_size, split["train"], data.corpus.sha256_file(archive)]).encode()).hexdigest()
  path = os.path.join(data_dir, f"tokenizer-{key[:16]}.json")
  if os.path.exists(path):
    tokenizer = data.Tokenizer(path)
  else:
    start = time.perf_counter()
    tokenizer = data.train_tokenizer((t for _, t in documents["train"]), config.vocab_size, path)
    logging.info("Trained the tokenizer in %.1f s: %s", time.perf_counter() - start, path)
  splits = {s: data.tokenize_documents(docs, tokenizer, os.path.join(data_dir, "tokens"))
            for s, docs in documents.items()}
  return TextData(tokenizer, splits, book_dir)


# ----------------------------------------------------------------------------------------------
# Runs


def _lm_config(config, attention: str) -> models.LMConfig:
  return models.lm_config(
      config.model, vocab_size=config.vocab_size, attention=attention, dtype=config.dtype,
      implementation=config.implementation,
      softmax_implementation=config.softmax_implementation, **dict(config.model_overrides))


def _train_config(config, num_steps: int) -> training.TrainConfig:
  return training.TrainConfig(
      num_steps=num_steps, learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
      weight_decay=config.weight_decay, grad_clip_norm=config.grad_clip_norm,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints, progress_bar=config.progress_bar)


def num_train_steps(config, windows: data.TrainWindows) -> int:
  """``config.num_steps``, or the steps of ``config.num_epochs`` passes over the train windows."""
  if config.num_steps:
    return int(config.num_steps)
  return max(1, round(config.num_epochs * windows.windows_per_epoch / config.batch_size))


def run_spec(config, attention: str, seed: int, text: TextData, num_steps: int) -> dict:
  """Everything that shapes a run's training; its hash names the run's directory."""
  return {
      "attention": attention, "seed": seed, "train_len": config.train_len,
      "batch_size": config.batch_size, "num_steps": num_steps,
      "model": dataclasses.asdict(_lm_config(config, attention)),
      "train": dataclasses.asdict(_train_config(config, num_steps)),
      "tokenizer_sha256": text.tokenizer.sha256, "train_corpus": text.splits["train"].key,
  }


def run_name(spec: dict) -> str:
  digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
  return f"{spec['attention']}-seed{spec['seed']}-{digest}"


def _implementation(config, attention: str) -> str:
  if attention == "stickbreaking":
    return config.implementation or sbjax.default_implementation()
  return config.softmax_implementation or nn.default_softmax_implementation()


def train_run(config, spec: dict, text: TextData, run_dir: str, *, train: bool = True):
  """Trains (or resumes, or loads when finished) one run; returns (model, state, info).

  With ``train=False`` the run must be finished already (its last checkpoint is loaded).
  """
  os.makedirs(run_dir, exist_ok=True)
  if training.is_primary():  # under jax.distributed, process 0 writes the files of all
    _write_json(os.path.join(run_dir, "run.json"), spec)
  train_config = dataclasses.replace(_train_config(config, spec["num_steps"]),
                                     mesh_shape=tuple(config.mesh_shape))
  mesh = make_mesh(*train_config.mesh_shape)
  with jax.set_mesh(mesh):
    model = models.DecoderLM(_lm_config(config, spec["attention"]), rngs=nnx.Rngs(spec["seed"]))
  steps = [int(os.path.basename(p))
           for p in glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]*"))]
  finished = spec["num_steps"] in steps
  if not train:
    if not finished:
      raise ValueError(f"run {run_dir} is not trained to step {spec['num_steps']} "
                       f"(checkpoints: {sorted(steps)}); train it first (without eval_text_dir).")
  windows = data.TrainWindows(text.splits["train"], config.train_len, config.batch_size,
                              spec["seed"])
  global_batches = windows.batch
  if config.use_grain:
    try:
      dataset = windows.grain_dataset(spec["num_steps"])  # same batches, grain's random access
    except ImportError as e:
      raise ImportError("config.use_grain=True needs grain (pip install grain); "
                        "--config.use_grain=False gives the same batches without it.") from e
    global_batches = dataset.__getitem__
  # Each process supplies its rows of every global batch (all of them in one process).
  rows = training.process_batch_rows(config.batch_size, mesh)
  batches = lambda step: {k: v[rows] for k, v in global_batches(step).items()}
  start = time.perf_counter()
  result = training.train(model, train_config, batches, run_dir, mesh=mesh)
  info = {"params": models.count_params(model), "mesh": mesh,
          "epochs": spec["num_steps"] * config.batch_size / windows.windows_per_epoch,
          "tokens_seen": spec["num_steps"] * config.batch_size * config.train_len}
  if not finished and len(result.metrics) > 1:  # trained here; the first interval compiles
    rate = np.median([m["steps_per_second"] for m in result.metrics[1:]])
    info["tokens_per_second"] = round(float(rate) * config.batch_size * config.train_len)
    info["train_seconds_this_process"] = round(time.perf_counter() - start, 1)
    info["peak_gib_after_training"] = _peak_gib()
  return model, result.state, info


# ----------------------------------------------------------------------------------------------
# Per-position evaluation


def make_position_loss(graphdef, rest, mesh, param_shardings, chunk: int):
  """``position_loss(params, batch) -> losses [B, L]`` float32, jitted.

  ``batch``: ``{"inputs": [B, L], "targets": [B, L]}`` (a window's tokens and the same shifted by
  one, as training batches: both shard over the mesh's data and context axes); ``losses[b, t]``
  is the cross-entropy of predicting ``targets[b, t]`` from ``inputs[b, :t + 1]``. The head and
  the loss run over chunks of ``chunk`` positions under ``lax.map``, so only ``[B, chunk, V]``
  logits exist at a time (``L`` a multiple of ``chunk``, or shorter than it).
  """

  def fn(params, batch):
    model = nnx.merge(graphdef, params, rest)
    targets = batch["targets"]  # [B, L]
    x = model.hidden_states(batch["inputs"])  # [B, L, D]
    b, length, d = x.shape
    c = min(chunk, length)
    if length % c:
      raise ValueError(f"eval length {length} is not a multiple of loss_chunk={c}.")
    xs = x.reshape(b, length // c, c, d).swapaxes(0, 1)  # [L / C, B, C, D]
    ts = targets.reshape(b, length // c, c).swapaxes(0, 1)  # [L / C, B, C]

    def chunk_loss(args):
      xc, tc = args
      return optax.softmax_cross_entropy_with_integer_labels(model.logits(xc), tc)

    losses = jax.lax.map(chunk_loss, (xs, ts))  # [L / C, B, C]
    return losses.swapaxes(0, 1).reshape(b, length)

  return jit_under_mesh(fn, mesh, in_shardings=(param_shardings, batch_sharding(mesh)),
                        out_shardings=NamedSharding(mesh, P()))


def score_windows(position_loss, params, windows: data.EvalWindows, batch_size: int,
                  sharding, progress: bool = False) -> np.ndarray:
  """Per-position losses ``[W, L]`` of every window, ``batch_size`` windows at a time."""
  tokens = windows.tokens
  w = len(tokens)
  pad = (-w) % batch_size  # repeat the last window; its copies are dropped
  if pad:
    tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
  rows = training.process_batch_rows(batch_size, sharding.mesh)  # this process's rows
  out = []
  for i in range(0, len(tokens), batch_size):
    window = tokens[i:i + batch_size][rows]  # [B_local, L + 1]
    batch = training.global_batch({"inputs": window[:, :-1], "targets": window[:, 1:]}, sharding)
    out.append(np.asarray(jax.device_get(position_loss(params, batch)), np.float32))
    if progress:
      logging.info("  scored %d/%d windows", min(i + batch_size, w), w)
  return np.concatenate(out)[:w]


def dump_qk(model: models.DecoderLM, tokens: np.ndarray, layers, heads, path: str, meta: dict):
  """Saves the queries and keys of ``heads`` in ``layers`` on ``tokens [T]`` to ``path`` (.npz).

  ``query``/``key`` are ``[layers, 1, T, heads, H]`` float16 (BTNH per layer, as the op takes
  them), computed in the model's dtype exactly as its attention does, for kernel benchmarks on
  trained rather than random inputs; ``scale`` is the op's default ``1/sqrt(H)``.
  """
  bad = [l for l in layers if not 0 <= l < len(model.blocks)]
  if bad:
    raise ValueError(f"qk_layers must be in [0, {len(model.blocks)}), got {bad}.")
  x = model.embedding[...].astype(jnp.dtype(model.config.dtype))[jnp.asarray(tokens)[None]]
  queries, keys = [], []
  for i, block in enumerate(model.blocks):
    if i in layers:
      attention = block.attention
      h = block.attention_norm(x).astype(attention.dtype or x.dtype)  # [1, T, D]
      q = jnp.einsum("BTD,DNH->BTNH", h, attention.query_kernel[...].astype(h.dtype))
      k = jnp.einsum("BTD,DKH->BTKH", h, attention.key_kernel[...].astype(h.dtype))
      queries.append(np.asarray(q[:, :, list(heads)], np.float32))
      keys.append(np.asarray(k[:, :, list(heads)], np.float32))
    x = block(x)
  query, key = np.stack(queries), np.stack(keys)
  if max(np.abs(query).max(), np.abs(key).max()) > 6e4:
    raise ValueError("q/k exceed float16's range; save them in float32.")
  np.savez_compressed(path, query=query.astype(np.float16), key=key.astype(np.float16),
                      layers=np.asarray(layers), heads=np.asarray(heads), tokens=tokens,
                      scale=np.float32(query.shape[-1] ** -0.5), meta=json.dumps(meta))


# ----------------------------------------------------------------------------------------------
# Statistics


def position_bin_edges(train_len: int, eval_len: int) -> list[int]:
  """``[0, T, 2T, 4T, ..., L]``: the trained length, then doublings up to ``L``."""
  edges = [0, train_len]
  while edges[-1] < eval_len:
    edges.append(min(2 * edges[-1], eval_len))
  return edges


def context_lengths(eval_len: int, train_len: int) -> list[int]:
  """``l = 512, 1024, ..., L``: doublings from ``min(512, T)`` up to ``L``, and ``L``."""
  lengths, l = [], min(512, train_len)
  while l < eval_len:
    lengths.append(l)
    l *= 2
  return lengths + [eval_len]


def book_bootstrap(losses: np.ndarray, documents: np.ndarray, stat, num_samples: int, seed: int,
                   confidence: float = 0.95):
  """``(estimate, low, high)`` of ``stat`` over windows, resampling BOOKS with replacement.

  Args:
    losses: ``[W, L]`` per-position losses of ``W`` windows.
    documents: ``[W]`` the book of each window.
    stat: maps ``(sums [..., L], windows [...])`` (per-position loss sums over some windows and
      their count) to ``[..., S]`` statistics; it must be a ratio of sums, so that a resample of
      books is scored exactly as the pooled windows of those books.
    num_samples: bootstrap resamples.
  """
  books, inverse = np.unique(documents, return_inverse=True)
  sums = np.zeros((len(books), losses.shape[1]), np.float64)
  np.add.at(sums, inverse, losses)
  counts = np.bincount(inverse, minlength=len(books)).astype(np.float64)
  estimate = stat(sums.sum(0), counts.sum())
  rng = np.random.default_rng((seed, _BOOTSTRAP_STREAM))
  picks = rng.integers(0, len(books), (num_samples, len(books)))  # [R, nb]
  weights = np.stack([np.bincount(p, minlength=len(books)) for p in picks]).astype(np.float64)
  samples = stat(weights @ sums, weights @ counts)  # [R, S]
  alpha = (1 - confidence) / 2
  low, high = np.quantile(samples, [alpha, 1 - alpha], axis=0)
  return estimate, low, high


def _bin_means(edges):
  def stat(sums, windows):
    parts = [sums[..., lo:hi].sum(-1) / (hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]
    return np.stack(parts, -1) / np.asarray(windows)[..., None]
  return stat


def _prefix_ppl(lengths):
  def stat(sums, windows):
    cum = np.cumsum(sums, -1)
    return np.exp(np.stack([cum[..., l - 1] / l for l in lengths], -1)
                  / np.asarray(windows)[..., None])
  return stat


def summarize(losses: np.ndarray, documents: np.ndarray, train_len: int, num_samples: int,
              seed: int = 0) -> dict:
  """``position_bins`` and ``ppl_at`` (with 95% book-bootstrap intervals) of ``losses [W, L]``."""
  length = losses.shape[1]
  edges = position_bin_edges(train_len, length)
  mean, low, high = book_bootstrap(losses, documents, _bin_means(edges), num_samples, seed)
  bins = [{"start": lo, "end": hi, "mean_loss": float(m), "ci_low": float(a), "ci_high": float(b)}
          for lo, hi, m, a, b in zip(edges[:-1], edges[1:], mean, low, high)]
  lengths = context_lengths(length, train_len)
  ppl, low, high = book_bootstrap(losses, documents, _prefix_ppl(lengths), num_samples, seed)
  ppl_at = {str(l): {"ppl": float(p), "ci_low": float(a), "ci_high": float(b)}
            for l, p, a, b in zip(lengths, ppl, low, high)}
  return {"position_bins": bins, "ppl_at": ppl_at}


def log_binned_curve(losses: np.ndarray, documents: np.ndarray, per_octave: int,
                     num_samples: int, seed: int = 0):
  """(bin centres, mean, low, high) of the per-position loss in log-spaced position bins."""
  length = losses.shape[1]
  edges = np.unique(np.round(np.logspace(0, np.log2(length), 1 + per_octave * int(np.log2(length)),
                                         base=2)).astype(int))
  edges = [0] + [int(e) for e in edges if e < length] + [length]
  mean, low, high = book_bootstrap(losses, documents, _bin_means(edges), num_samples, seed)
  centres = np.sqrt(np.maximum(edges[:-1], 1) * np.asarray(edges[1:]))
  return centres, mean, low, high


# ----------------------------------------------------------------------------------------------
# Plots


def _training_curve(run_dir: str):
  """(steps, losses) of the training loss in the run's metrics log (what TensorBoard shows too;
  the log also travels with a run's results, its event files need not)."""
  entries = training.read_metrics_log(os.path.join(run_dir, training.METRICS_FILE), 2**62,
                                      rewrite=False)
  train = [e for e in entries if e["split"] == "train"]
  return np.asarray([e["step"] for e in train]), np.asarray([e["loss"] for e in train])


def plot_all(curves: dict, records: list[dict], run_dirs: dict, out_dir: str, title: str) -> None:
  """The three plots: per-position loss, perplexity of the first l tokens, training loss.

  Args:
    curves: ``{attention: (centres, mean, low, high)}`` log-binned per-position loss.
    records: summary records of one split (``ppl_at`` per context length).
    run_dirs: ``{attention: [run directories]}`` for the training curves.
  """
  colors = {"stickbreaking": "C0", "softmax_rope": "C1", "softmax_nope": "C2"}
  train_len = records[0]["train_len"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for attention, (x, mean, low, high) in curves.items():
    ax.plot(x, mean, label=attention, color=colors.get(attention))
    ax.fill_between(x, low, high, alpha=0.2, color=colors.get(attention), lw=0)
  ax.axvline(train_len, color="k", ls="--", lw=1, label=f"training length {train_len}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position in the window")
  ax.set_ylabel("next-token loss (nats), log-spaced bins")
  all_means = np.concatenate([c[1][len(c[1]) // 3:] for c in curves.values()])
  ax.set_ylim(max(0.0, all_means.min() - 0.5), min(all_means.max() + 0.5, all_means.min() + 6))
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(f"{title}: loss per position (95% book-bootstrap bands)")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, PLOTS["position"]), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  by_attention = collections.defaultdict(list)
  for r in records:
    by_attention[r["attention"]].append(r)
  for attention, recs in by_attention.items():
    lengths = sorted(int(l) for l in recs[0]["ppl_at"])
    ppl = np.mean([[r["ppl_at"][str(l)]["ppl"] for l in lengths] for r in recs], 0)
    ax.plot(lengths, ppl, marker="o", label=attention, color=colors.get(attention))
  ax.axvline(train_len, color="k", ls="--", lw=1, label=f"training length {train_len}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context length l (first l tokens of each window)")
  ax.set_ylabel("perplexity of the first l tokens")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  ax.set_title(f"{title}: perplexity vs context length")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, PLOTS["context"]), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for attention, dirs in run_dirs.items():
    for i, run_dir in enumerate(dirs):
      steps, losses = _training_curve(run_dir)
      if len(steps):
        ax.plot(steps, losses, color=colors.get(attention), alpha=1.0 if i == 0 else 0.5,
                label=attention if i == 0 else None)
  ax.set_xlabel("step")
  ax.set_ylabel(f"training loss (nats, length {train_len})")
  ax.set_yscale("log")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  ax.set_title("training loss")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, PLOTS["train"]), dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The experiment


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # a killed process never leaves a half-written file


def _evaluate_run(config, model, state, info, windows: data.EvalWindows, cache: str,
                  scorers: dict, name: str, scoring: dict) -> np.ndarray:
  """Per-position losses ``[W, L]`` of a run on ``windows``, cached in ``cache`` (.npy), with
  ``scoring`` (``_scoring``) beside it.

  ``scorers[name]`` keeps the run's jitted scorer, so later splits reuse its compilation.
  """
  if os.path.exists(cache):
    losses = np.load(cache)
    if losses.shape == (len(windows.tokens), windows.tokens.shape[1] - 1):
      return losses
  mesh = info["mesh"]
  if name not in scorers:
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    scorers[name] = make_position_loss(graphdef, rest, mesh, shardings, config.loss_chunk)
  position_loss = scorers[name]
  start = time.perf_counter()
  losses = score_windows(position_loss, state.params, windows, config.eval_batch_size,
                         batch_sharding(mesh), progress=config.progress_bar)
  logging.info("  %d windows of %d scored in %.1f s (peak device memory %s GiB)", len(losses),
               losses.shape[1], time.perf_counter() - start, _peak_gib())
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"non-finite eval losses for {cache}.")
  if training.is_primary():
    np.save(cache + ".tmp.npy", losses)
    os.replace(cache + ".tmp.npy", cache)
    _write_json(_scoring_path(cache), scoring)
  return losses


def _peak_gib():
  """Peak memory so far of this process's first device in GiB (None where the backend does not
  report it)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 2)


def _device() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')}"


def _scoring(config, attention: str) -> dict:
  """What scores a run in this process: ``{"implementation", "device", "jax"}``."""
  return {"implementation": _implementation(config, attention), "device": _device(),
          "jax": jax.__version__}


def _scoring_path(cache: str) -> str:
  return cache[:-len(".npy")] + ".json"


def _scored_by(cache: str, config, attention: str) -> dict:
  """What computed a run's cached losses: the ``_scoring`` saved beside them, so that a summary
  rewritten on another machine still names the scoring one (this process's for older caches)."""
  if os.path.exists(_scoring_path(cache)):
    with open(_scoring_path(cache)) as f:
      return json.load(f)
  return _scoring(config, attention)


def validate(config) -> None:
  """Checks the config before any work; raises ``ValueError`` naming the field."""
  for name in ("train_len", "eval_len_multiple", "batch_size", "vocab_size", "loss_chunk",
               "eval_batch_size", "bootstrap_samples"):
    if not isinstance(config[name], int) or config[name] < 1:
      raise ValueError(f"config.{name} must be a positive int, got {config[name]!r}.")
  if not config.attentions or not config.seeds:
    raise ValueError(f"config.attentions and config.seeds must be non-empty, got "
                     f"{config.attentions!r}, {config.seeds!r}.")
  from sbjax.nn import ATTENTIONS  # pylint: disable=g-import-not-at-top
  bad = [a for a in config.attentions if a not in ATTENTIONS]
  if bad:
    raise ValueError(f"config.attentions must be drawn from {ATTENTIONS}, got {bad}.")
  if not isinstance(config.max_train_books, int) or config.max_train_books < 0:
    raise ValueError(f"config.max_train_books must be an int >= 0, got {config.max_train_books!r}.")
  if not (config.num_steps or config.num_epochs > 0):
    raise ValueError(f"set config.num_steps or config.num_epochs > 0, got "
                     f"{config.num_steps=}, {config.num_epochs=}.")
  eval_len = config.train_len * config.eval_len_multiple
  if eval_len > config.loss_chunk and eval_len % config.loss_chunk:
    raise ValueError(f"config.loss_chunk={config.loss_chunk} must divide the eval length {eval_len}.")
  try:  # the form of the mesh, then whether the devices (of every process) make it
    shape = training.TrainConfig(num_steps=1, mesh_shape=tuple(config.mesh_shape)).mesh_shape
    make_mesh(*shape)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.mesh_shape={config.mesh_shape!r}: {e}") from e
  context = shape[2] if len(shape) > 2 else 1
  if config.train_len % context:
    raise ValueError(f"config.train_len={config.train_len} must be a multiple of the mesh's "
                     f"context size {context} (config.mesh_shape={config.mesh_shape!r}).")
  if config.eval_text_dir and not os.path.isdir(os.path.expanduser(config.eval_text_dir)):
    raise ValueError(f"config.eval_text_dir={config.eval_text_dir!r} is not a directory.")
  if not os.path.isfile(os.path.expanduser(config.corpus_archive)):
    raise ValueError(f"config.corpus_archive={config.corpus_archive!r} is not a file.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains every (attention, seed) run and scores it; returns the summary records.

  Writes ``summary.json`` and the plots to ``workdir`` (to ``workdir/eval_text/<name>/`` with
  ``config.eval_text_dir``) after each run, so an interrupted study keeps what finished.
  """
  validate(config)
  primary = training.is_primary()  # under jax.distributed, process 0 writes the outputs
  os.makedirs(workdir, exist_ok=True)
  text = training.primary_first(prepare_data, config)  # the others read its caches
  if primary:
    shutil.copyfile(text.tokenizer.path, os.path.join(workdir, "tokenizer.json"))
  eval_len = config.train_len * config.eval_len_multiple
  max_windows = config.max_eval_windows_per_book or None
  if config.eval_text_dir:
    directory = os.path.expanduser(config.eval_text_dir)
    name = os.path.basename(os.path.normpath(directory))
    documents = data.read_documents(directory)
    corpus = training.primary_first(data.tokenize_documents, documents, text.tokenizer,
                                    os.path.join(os.path.expanduser(config.data_dir), "tokens"))
    try:
      targets = {f"text:{name}": data.eval_windows(corpus, eval_len, max_windows)}
    except ValueError as e:
      raise ValueError(f"config.eval_text_dir={config.eval_text_dir!r}: {e}") from e
    out_dir = os.path.join(workdir, "eval_text", name)
  else:
    targets = {"validation": data.eval_windows(text.splits["validation"], eval_len, max_windows)}
    if config.eval_test:
      targets["test"] = data.eval_windows(text.splits["test"], eval_len, max_windows)
    out_dir = workdir
  os.makedirs(out_dir, exist_ok=True)
  train_windows = data.TrainWindows(text.splits["train"], config.train_len, config.batch_size, 0)
  num_steps = num_train_steps(config, train_windows)
  logging.info("Train split: %d tokens in %d windows of %d; %d steps of %d windows (%.2f epochs)",
               int(text.splits["train"].lengths.sum()), train_windows.windows_per_epoch,
               config.train_len + 1, num_steps, config.batch_size,
               num_steps * config.batch_size / train_windows.windows_per_epoch)

  records, losses_of, run_dirs = [], collections.defaultdict(list), collections.defaultdict(list)
  scorers = {}  # run name -> jitted per-position loss
  # The test split is scored after every run has trained and been validated: once, at the end.
  order = [s for s in targets if s != "test"] + [s for s in targets if s == "test"]
  runs = [(a, s) for a in config.attentions for s in config.seeds]
  for split_name in order:
    windows = targets[split_name]
    key = hashlib.sha256(windows.tokens.tobytes()).hexdigest()[:10]
    for attention, seed in runs:
      spec = run_spec(config, attention, seed, text, num_steps)
      run_dir = os.path.join(workdir, "runs", run_name(spec))
      if split_name == order[0]:
        run_dirs[attention].append(run_dir)
      logging.info("%s on %s (%d windows of %d)", run_name(spec), split_name,
                   len(windows.tokens), eval_len)
      cache = os.path.join(run_dir, f"losses-{split_name.replace(':', '_')}-{key}.npy")
      info = {}
      if os.path.exists(cache) and os.path.exists(os.path.join(run_dir, "info.json")):
        losses = np.load(cache)
        with open(os.path.join(run_dir, "info.json")) as f:
          info = json.load(f)
      else:
        model, state, info = train_run(config, spec, text, run_dir,
                                       train=not config.eval_text_dir)
        losses = _evaluate_run(config, model, state, info, windows, cache, scorers,
                               run_name(spec), _scoring(config, attention))
        info = {k: v for k, v in info.items() if k != "mesh"}
        info_path = os.path.join(run_dir, "info.json")
        if "tokens_per_second" in info or not os.path.exists(info_path):
          if primary:  # else keep the throughput of the process that trained
            _write_json(info_path, info)
        else:
          with open(info_path) as f:
            info = json.load(f)
        del model, state
      losses_of[split_name, attention].append((losses, windows.document))
      stats = summarize(losses, windows.document, config.train_len, config.bootstrap_samples)
      records.append({
          "attention": attention, "seed": seed, "train_len": config.train_len,
          "eval_len": eval_len, "split": split_name, "windows": int(len(windows.tokens)),
          "books": int(len(np.unique(windows.document))), **stats,
          "mean_loss": float(losses.mean()), "run": run_name(spec), "num_steps": num_steps,
          "batch_size": config.batch_size, "model": config.model,
          "params": info.get("params"), "epochs": info.get("epochs"),
          "tokens_seen": info.get("tokens_seen"), "tokens_per_second": info.get("tokens_per_second"),
          "dtype": config.dtype, "vocab_size": config.vocab_size,
          "tokenizer_sha256": text.tokenizer.sha256, **_scored_by(cache, config, attention),
      })
      if primary:
        _write_json(os.path.join(out_dir, SUMMARY), records)
  final = order[-1]
  curves = {}
  for attention in config.attentions:
    pairs = losses_of[final, attention]
    losses = np.concatenate([l for l, _ in pairs])
    # Seeds share books: a bootstrap over books pools each resampled book's windows of every seed.
    documents = np.concatenate([d for _, d in pairs])
    curves[attention] = log_binned_curve(losses, documents, config.plot_bins_per_octave,
                                         config.bootstrap_samples)
  if primary:
    plot_all(curves, [r for r in records if r["split"] == final], run_dirs, out_dir, final)
  if config.qk_layers and "stickbreaking" in config.attentions and not config.eval_text_dir:
    spec = run_spec(config, "stickbreaking", config.seeds[0], text, num_steps)
    model, _, _ = train_run(config, spec, text, os.path.join(workdir, "runs", run_name(spec)),
                            train=False)
    # One sequence on one device: the trained state, sharded over the run's mesh (and processes),
    # gathered whole to the host first (every process takes part), then process 0 dumps.
    graphdef, state = nnx.split(model)
    state = multihost_utils.process_allgather(state, tiled=True)
    if primary:
      window = data.eval_windows(text.splits["validation"], config.qk_window_len, 1)
      with jax.set_mesh(make_mesh(1, 1)):
        model = nnx.merge(graphdef, jax.device_put(state, jax.local_devices()[0]))
        dump_qk(model, window.tokens[0, :-1], tuple(config.qk_layers), tuple(config.qk_heads),
                os.path.join(out_dir, "qk_stickbreaking.npz"),
                {"run": run_name(spec), "book": window.names[int(window.document[0])],
                 "window": "first tokens of the book", "dtype": config.dtype})
  return records
