"""The ELTeC-eng corpus: a checked, cached extraction of the archive, its book-level split, and
plain-text directories of a user's own documents.

The archive (``eltec-eng-txt.tar.xz``, 99 novels as ``eltec_txt/*.txt``) and ``split.json`` ship
in ``shared/data/eltec-eng/``. ``extract_corpus`` verifies the archive's sha256 and unpacks it
once into a cache directory; ``load_split`` reads the split and checks it against its rule (file
names sorted by the sha256 of the name: 10 test, 5 validation, the rest train).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tarfile

ARCHIVE_SHA256 = "5b8ca5a4a8899ff05953cb1bffae4fafac610361a13f3667a043157e676b5081"
SPLITS = ("train", "validation", "test")
_SPLIT_SIZES = {"test": 10, "validation": 5}  # the rest is train


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def extract_corpus(archive: str, data_dir: str, *, expected_sha256: str | None = ARCHIVE_SHA256
                   ) -> str:
  """Unpacks ``archive`` under ``data_dir`` (once) and returns the directory of ``*.txt`` books.

  The archive's sha256 must equal ``expected_sha256`` (``None`` skips the check, for other
  archives of the same layout). A finished extraction is marked by a file holding the archive's
  sha256, so an interrupted one is redone and a different archive gets its own directory.
  """
  if not os.path.isfile(archive):
    raise FileNotFoundError(f"archive={archive!r} is not a file.")
  digest = sha256_file(archive)
  if expected_sha256 is not None and digest != expected_sha256:
    raise ValueError(f"archive={archive!r} has sha256 {digest}, expected {expected_sha256}.")
  target = os.path.join(data_dir, f"corpus-{digest[:12]}")
  marker = os.path.join(target, "EXTRACTED")
  if not os.path.exists(marker):
    shutil.rmtree(target, ignore_errors=True)
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with tarfile.open(archive, "r:*") as tar:
      tar.extractall(tmp, filter="data")
    os.replace(tmp, target)
    with open(marker, "w") as f:
      f.write(digest + "\n")
  books = os.path.join(target, "eltec_txt")
  if not os.path.isdir(books):
    raise ValueError(f"archive={archive!r} holds no eltec_txt/ directory.")
  return books


def load_split(path: str, book_dir: str | None = None) -> dict[str, list[str]]:
  """``{"train", "validation", "test"}: [file names]`` from ``split.json``, checked against its
  rule; with ``book_dir``, also that every named book is there."""
  with open(path) as f:
    split = json.load(f)
  missing = [s for s in SPLITS if s not in split]
  if missing:
    raise ValueError(f"split file {path!r} lacks the splits {missing}.")
  names = sorted(n for s in SPLITS for n in split[s])
  by_hash = sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
  expected = {"test": by_hash[:10], "validation": by_hash[10:15], "train": by_hash[15:]}
  for s in SPLITS:
    if sorted(split[s]) != sorted(expected[s]):
      raise ValueError(f"split file {path!r}: {s!r} does not follow its rule ({split.get('rule')}).")
  if book_dir is not None:
    absent = [n for n in names if not os.path.isfile(os.path.join(book_dir, n))]
    if absent:
      raise ValueError(f"book_dir={book_dir!r} lacks {len(absent)} books of the split, e.g. {absent[:3]}.")
  return {s: list(split[s]) for s in SPLITS}


def read_documents(directory: str, names: list[str] | None = None) -> list[tuple[str, str]]:
  """``[(name, text)]`` of ``names`` in ``directory`` (default: every ``*.txt``, sorted)."""
  if not os.path.isdir(directory):
    raise ValueError(f"directory={directory!r} is not a directory.")
  if names is None:
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.txt")))
    if not names:
      raise ValueError(f"directory={directory!r} holds no .txt files.")
  documents = []
  for name in names:
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      documents.append((name, f.read()))
  return documents
