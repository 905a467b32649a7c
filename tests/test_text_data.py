"""Tests of the text pipeline: corpus archive and split, byte-level BPE, token memmaps, windows.

Real text comes from ``tests/data/eltec_excerpts/`` (about 4 KB of each of 20 ELTeC novels).
"""

import hashlib
import json
import os
import tarfile

import numpy as np
import pytest

from sbjax import data

EXCERPTS = os.path.join(os.path.dirname(__file__), "data", "eltec_excerpts")


def make_archive(directory, names=None):
  """A tar.xz of the excerpts in the corpus layout (``eltec_txt/*.txt``) and its split.json."""
  names = names or sorted(n for n in os.listdir(EXCERPTS) if n.endswith(".txt"))
  archive = os.path.join(directory, "excerpts.tar.xz")
  with tarfile.open(archive, "w:xz") as tar:
    for name in names:
      tar.add(os.path.join(EXCERPTS, name), arcname=f"eltec_txt/{name}")
  by_hash = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
  split = {"rule": "sha256 of the name: 10 test, 5 validation, the rest train",
           "test": by_hash[:10], "validation": by_hash[10:15], "train": by_hash[15:]}
  with open(os.path.join(directory, "split.json"), "w") as f:
    json.dump(split, f)
  return archive, os.path.join(directory, "split.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(book_dir, split, tokenizer) over the excerpts; the tokenizer trained on the train books."""
  tmp = tmp_path_factory.mktemp("corpus")
  archive, split_json = make_archive(str(tmp))
  book_dir = data.extract_corpus(archive, str(tmp / "cache"), expected_sha256=None)
  split = data.load_split(split_json, book_dir)
  train = data.read_documents(book_dir, split["train"])
  tokenizer = data.train_tokenizer((t for _, t in train), 512, str(tmp / "tok.json"))
  return book_dir, split, tokenizer


def test_extract_checks_the_archive_and_caches(tmp_path):
  archive, _ = make_archive(str(tmp_path))
  with pytest.raises(ValueError, match="sha256"):
    data.extract_corpus(archive, str(tmp_path / "cache"))  # not the ELTeC archive's hash
  with pytest.raises(FileNotFoundError, match="archive="):
    data.extract_corpus(str(tmp_path / "missing.tar.xz"), str(tmp_path / "cache"))
  book_dir = data.extract_corpus(archive, str(tmp_path / "cache"), expected_sha256=None)
  assert len(os.listdir(book_dir)) == 20
  os.remove(os.path.join(book_dir, sorted(os.listdir(book_dir))[0]))
  # A finished extraction is reused (the marker file), not redone.
  assert data.extract_corpus(archive, str(tmp_path / "cache"), expected_sha256=None) == book_dir
  assert len(os.listdir(book_dir)) == 19


def test_split_rule_is_enforced(tmp_path):
  _, split_json = make_archive(str(tmp_path))
  split = data.load_split(split_json)
  assert [len(split[s]) for s in ("train", "validation", "test")] == [5, 5, 10]
  with open(split_json) as f:
    tampered = json.load(f)
  tampered["train"][0], tampered["test"][0] = tampered["test"][0], tampered["train"][0]
  with open(split_json, "w") as f:
    json.dump(tampered, f)
  with pytest.raises(ValueError, match="does not follow its rule"):
    data.load_split(split_json)


def test_tokenizer_round_trip_on_real_text(corpus):
  book_dir, split, tokenizer = corpus
  assert tokenizer.vocab_size == 512 and tokenizer.eot_id == 0
  held_out = data.read_documents(book_dir, split["test"])  # text the BPE never saw
  assert any(ord(c) > 127 for _, t in held_out for c in t)  # accents, dashes, curly quotes
  for _, text in held_out:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 512
    assert tokenizer.decode(ids) == text
  odd = "naïve café — ‘quoted’\n\n\tend \u2028 日本 🙂" + data.EOT
  assert tokenizer.decode(tokenizer.encode(odd)) == odd
  assert list(tokenizer.encode(data.EOT)) == [tokenizer.eot_id]


def test_tokenizer_is_deterministic_and_reloads(corpus, tmp_path):
  book_dir, split, tokenizer = corpus
  train = data.read_documents(book_dir, split["train"])
  again = data.train_tokenizer((t for _, t in train), 512, str(tmp_path / "again.json"))
  assert again.sha256 == tokenizer.sha256  # same merges, same file
  reloaded = data.Tokenizer(tokenizer.path)
  text = train[0][1]
  np.testing.assert_array_equal(reloaded.encode(text), tokenizer.encode(text))
  other = data.train_tokenizer((t for _, t in train), 400, str(tmp_path / "other.json"))
  assert other.sha256 != tokenizer.sha256


@pytest.mark.parametrize("vocab_size", [256, 70000, 1.5])
def test_tokenizer_rejects_bad_vocab_size(tmp_path, vocab_size):
  with pytest.raises(ValueError, match="vocab_size"):
    data.train_tokenizer(["some text"], vocab_size, str(tmp_path / "t.json"))


def test_token_cache_layout_and_rebuild(corpus, tmp_path):
  book_dir, split, tokenizer = corpus
  docs = data.read_documents(book_dir, split["validation"])
  tokens = data.tokenize_documents(docs, tokenizer, str(tmp_path))
  assert tokens.tokens.dtype == np.uint16 and isinstance(tokens.tokens, np.memmap)
  assert tokens.names == tuple(split["validation"])
  for d, (_, text) in enumerate(docs):
    doc = tokens.document(d)
    assert doc[-1] == tokenizer.eot_id  # end-of-text after every document
    assert tokenizer.decode(doc[:-1]) == text
  assert data.tokenize_documents(docs, tokenizer, str(tmp_path)).key == tokens.key  # cached
  changed = [(docs[0][0], docs[0][1] + " more")] + docs[1:]
  assert data.tokenize_documents(changed, tokenizer, str(tmp_path)).key != tokens.key
  other = data.train_tokenizer([t for _, t in docs], 300, str(tmp_path / "other.json"))
  assert data.tokenize_documents(docs, other, str(tmp_path)).key != tokens.key
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".u16")]) == 3


@pytest.fixture(scope="module")
def train_corpus(corpus, tmp_path_factory):
  book_dir, split, tokenizer = corpus
  docs = data.read_documents(book_dir, split["train"] + split["validation"])
  return data.tokenize_documents(docs, tokenizer, str(tmp_path_factory.mktemp("tokens")))


def test_train_windows_stay_in_a_document_and_cover_each_epoch(train_corpus):
  windows = data.TrainWindows(train_corpus, seq_len=32, batch_size=4, seed=0)
  n = windows.windows_per_epoch
  assert n == int(((train_corpus.lengths - 32) // 32).sum())
  for epoch in range(2):
    starts = [windows.window_start(epoch * n + i) for i in range(n)]
    assert len(set(starts)) == n  # every window once per epoch
    for d, start in starts:
      assert train_corpus.offsets[d] <= start
      assert start + 33 <= train_corpus.offsets[d + 1]  # inputs and targets in one document
  first = {windows.window_start(i) for i in range(n)}
  second = {windows.window_start(n + i) for i in range(n)}
  assert first != second  # a new epoch cuts the documents at new places
  batch = windows.batch(3)
  assert batch["inputs"].shape == batch["targets"].shape == (4, 32)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_train_batches_are_a_pure_function_of_step_and_seed(train_corpus):
  """A resumed run (a new process, a new object) sees the batches an uninterrupted one saw."""
  run = data.TrainWindows(train_corpus, 32, 4, seed=7)
  seen = [run.batch(step) for step in range(3 * run.windows_per_epoch // 4)]  # ~3 epochs
  resumed = data.TrainWindows(train_corpus, 32, 4, seed=7)
  for step in (len(seen) - 1, 5, len(seen) // 2, 0):  # any order: no hidden iterator state
    for k in seen[step]:
      np.testing.assert_array_equal(resumed.batch(step)[k], seen[step][k])
  other_seed = data.TrainWindows(train_corpus, 32, 4, seed=8)
  assert not np.array_equal(other_seed.batch(0)["inputs"], seen[0]["inputs"])


def test_grain_dataset_is_the_same_function(train_corpus):
  windows = data.TrainWindows(train_corpus, 32, 4, seed=3)
  dataset = windows.grain_dataset(num_steps=50)
  assert len(dataset) == 50
  for step in (0, 17, 49):
    for k, v in windows.batch(step).items():
      np.testing.assert_array_equal(dataset[step][k], v)


def test_eval_windows_never_cross_a_document(train_corpus):
  windows = data.eval_windows(train_corpus, 128)
  assert windows.tokens.shape[1] == 129
  expected = sum((int(n) - 1) // 128 for n in train_corpus.lengths)
  assert len(windows.tokens) == expected
  for row, d in zip(windows.tokens, windows.document):
    doc = np.asarray(train_corpus.document(d), np.int32)
    k = [i for i in range(0, len(doc) - 128, 128) if np.array_equal(doc[i:i + 129], row)]
    assert k, "an eval window is not a slice of its own document"
  capped = data.eval_windows(train_corpus, 128, max_per_document=1)
  assert len(capped.tokens) == len(np.unique(windows.document))
  with pytest.raises(ValueError, match="no document holds"):
    data.eval_windows(train_corpus, 10**6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0, batch_size=1, seed=0), "seq_len"),
    (dict(seq_len=8, batch_size=0, seed=0), "batch_size"),
    (dict(seq_len=10**6, batch_size=1, seed=0), "no document has"),
])
def test_train_windows_reject_bad_arguments(train_corpus, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.TrainWindows(train_corpus, **kwargs)
