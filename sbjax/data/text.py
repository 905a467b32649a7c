"""Tokenised documents in a uint16 memmap, and the training and evaluation windows over them.

``TokenizedCorpus``: the token ids of every document, each followed by the end-of-text token, in
one flat uint16 file with ``offsets`` (document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``).
``tokenize_documents`` builds it once under a cache directory, keyed by the tokenizer's sha256
and the documents' names and contents, so a changed corpus or tokenizer is rebuilt, never reused.

Training batches are a pure function of ``(step, seed)`` (``TrainWindows.batch``): epoch ``e`` is
a seeded permutation of all in-document windows of ``T + 1`` tokens, where each document's windows
start at a seeded per-(epoch, document) shift in ``[0, T)``, so successive epochs cut the text at
different places. Batch ``s`` holds windows ``s * B ... s * B + B - 1`` of the concatenated
epochs: a resumed run sees exactly the batches an uninterrupted one would.
``TrainWindows.grain_dataset`` is the same function as a ``grain.MapDataset``.

Evaluation windows (``eval_windows``) are the non-overlapping ``L + 1``-token windows from the
start of each document; no window crosses a document boundary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from sbjax.data.tokenizer import Tokenizer

_TRAIN_STREAM, _SHIFT_STREAM = 0, 1  # independent NumPy streams per purpose


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
  """``tokens [N]`` uint16 (a read-only memmap), ``offsets [D + 1]`` int64, ``names [D]``."""

  tokens: np.ndarray
  offsets: np.ndarray
  names: tuple[str, ...]
  key: str  # cache key: sha256 of the tokenizer and the documents

  @property
  def lengths(self) -> np.ndarray:
    """Tokens per document ``[D]``, its end-of-text token included."""
    return np.diff(self.offsets)

  def document(self, d: int) -> np.ndarray:
    return self.tokens[self.offsets[d]:self.offsets[d + 1]]


def tokenize_documents(documents: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                       cache_dir: str) -> TokenizedCorpus:
  """The ``TokenizedCorpus`` of ``documents`` (``[(name, text)]``), built once under ``cache_dir``.

  The files are ``tokens-<key>.u16`` and ``tokens-<key>.json`` (offsets, names), written
  atomically; ``key`` hashes the tokenizer file's sha256 and every document's name and text.
  """
  if not documents:
    raise ValueError("documents is empty.")
  digest = hashlib.sha256(tokenizer.sha256.encode())
  for name, text in documents:
    digest.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
  key = digest.hexdigest()[:16]
  base = os.path.join(cache_dir, f"tokens-{key}")
  names = tuple(name for name, _ in documents)
  if not os.path.exists(base + ".json"):
    os.makedirs(cache_dir, exist_ok=True)
    ids = tokenizer.encode_batch([text for _, text in documents])
    ids = [np.append(x, tokenizer.eot_id) for x in ids]  # end-of-text after every document
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    np.concatenate(ids).astype(np.uint16).tofile(base + ".u16.tmp")
    os.replace(base + ".u16.tmp", base + ".u16")
    with open(base + ".json.tmp", "w") as f:  # written last: its presence marks a finished build
      json.dump({"offsets": offsets.tolist(), "names": names,
                 "tokenizer_sha256": tokenizer.sha256}, f)
    os.replace(base + ".json.tmp", base + ".json")
  with open(base + ".json") as f:
    meta = json.load(f)
  offsets = np.asarray(meta["offsets"], np.int64)
  tokens = np.memmap(base + ".u16", dtype=np.uint16, mode="r")
  if tuple(meta["names"]) != names or len(tokens) != offsets[-1]:
    raise ValueError(f"token cache {base} does not match its documents; delete it to rebuild.")
  return TokenizedCorpus(tokens, offsets, names, key)


class TrainWindows:
  """Training batches ``batch(step)`` of ``batch_size`` windows of ``seq_len + 1`` tokens.

  Args:
    corpus: the training documents.
    seq_len: the training length ``T`` (``inputs`` and ``targets`` are ``[B, T]``).
    batch_size: windows per batch ``B``.
    seed: the permutations' and shifts' seed.
  """

  def __init__(self, corpus: TokenizedCorpus, seq_len: int, batch_size: int, seed: int):
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")
    self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed
    # With a shift below T, a document of n tokens always holds (n - T) // T windows of T + 1.
    self.windows_per_document = np.maximum((corpus.lengths - seq_len) // seq_len, 0)
    self.windows_per_epoch = int(self.windows_per_document.sum())
    if self.windows_per_epoch < 1:
      raise ValueError(f"no document has the {2 * seq_len} tokens a window of {seq_len=} needs "
                       f"(longest: {int(corpus.lengths.max())}).")
    self._document_of = np.repeat(np.arange(len(corpus.names)), self.windows_per_document)
    self._index_in_document = (np.arange(self.windows_per_epoch)
                               - np.repeat(np.cumsum(self.windows_per_document)
                                           - self.windows_per_document, self.windows_per_document))
    self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  @property
  def tokens_per_epoch(self) -> int:
    return self.windows_per_epoch * self.seq_len

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(window order ``[W]``, per-document shift ``[D]``) of ``epoch``."""
    cached = self._epoch_cache.get(epoch)
    if cached is None:
      order = np.random.default_rng((self.seed, _TRAIN_STREAM, epoch)).permutation(
          self.windows_per_epoch)
      shift = np.random.default_rng((self.seed, _SHIFT_STREAM, epoch)).integers(
          0, self.seq_len, len(self.corpus.names))
      cached = order, shift
      self._epoch_cache = {epoch: cached}  # batches walk epochs in order: keep one
    return cached

  def window_start(self, index: int) -> tuple[int, int]:
    """(document, start token in the flat array) of global window ``index``."""
    epoch, i = divmod(int(index), self.windows_per_epoch)
    order, shift = self._epoch(epoch)
    w = order[i]
    d = int(self._document_of[w])
    return d, int(self.corpus.offsets[d] + shift[d] + self._index_in_document[w] * self.seq_len)

  def window(self, index: int) -> np.ndarray:
    """Global window ``index``: ``[T + 1]`` int32 tokens of one document."""
    _, start = self.window_start(index)
    return np.asarray(self.corpus.tokens[start:start + self.seq_len + 1], np.int32)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """``{"inputs", "targets"}``, each ``[B, T]`` int32: windows ``step * B ...`` in order."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step=}.")
    windows = np.stack([self.window(step * self.batch_size + i) for i in range(self.batch_size)])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

  def grain_dataset(self, num_steps: int):
    """``grain.MapDataset`` whose item ``step`` is ``batch(step)``, for ``step < num_steps``.

    The same pure index function under grain's random-access API (``ds[step]``, ``len(ds)``),
    e.g. for ``ds.to_iter_dataset()`` with prefetching. Needs ``grain`` installed.
    """
    import grain  # pylint: disable=g-import-not-at-top  # optional: only this method needs it

    def split(window):
      return {"inputs": window[:-1], "targets": window[1:]}

    return (grain.MapDataset.range(num_steps * self.batch_size)
            .map(self.window).map(split).batch(self.batch_size))


@dataclasses.dataclass(frozen=True)
class EvalWindows:
  """Evaluation windows: ``tokens [W, L + 1]`` int32 and ``document [W]`` (index into names)."""

  tokens: np.ndarray
  document: np.ndarray
  names: tuple[str, ...]


def eval_windows(corpus: TokenizedCorpus, length: int, max_per_document: int | None = None
                 ) -> EvalWindows:
  """Non-overlapping windows of ``length + 1`` tokens from the start of each document.

  Documents shorter than ``length + 1`` tokens give none; ``max_per_document`` keeps the first
  windows of each document. Raises ``ValueError`` when no document is long enough.
  """
  if not isinstance(length, int) or length < 1:
    raise ValueError(f"length must be a positive int, got {length=}.")
  rows, owners = [], []
  for d in range(len(corpus.names)):
    n = (int(corpus.lengths[d]) - 1) // length
    if max_per_document is not None:
      n = min(n, max_per_document)
    doc = corpus.document(d)
    for k in range(n):
      rows.append(np.asarray(doc[k * length:(k + 1) * length + 1], np.int32))
      owners.append(d)
  if not rows:
    raise ValueError(f"no document holds {length + 1} tokens for a window of {length=} "
                     f"(longest: {int(corpus.lengths.max())} tokens).")
  return EvalWindows(np.stack(rows), np.asarray(owners), corpus.names)
