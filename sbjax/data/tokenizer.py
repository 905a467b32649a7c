"""A byte-level BPE tokenizer (HuggingFace ``tokenizers``), trained offline and saved as one file.

Byte-level: every string encodes (no unknown token) and ``decode(encode(text)) == text`` exactly.
The end-of-text token ``<|endoftext|>`` (id 0) separates documents. Training is deterministic for
a given text, vocabulary size and ``tokenizers`` version; ``Tokenizer.sha256`` (of the saved
file) identifies the merges, so caches built from a tokenizer can be keyed by it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sbjax.data.corpus import sha256_file

EOT = "<|endoftext|>"
_MAX_UINT16_VOCAB = 1 << 16  # token ids are stored as uint16


class Tokenizer:
  """A trained byte-level BPE loaded from ``path``.

  Attributes: ``path``, ``sha256`` (of the file), ``vocab_size``, ``eot_id``.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"path={path!r}: no tokenizer file there.")
    self.path = path
    self.sha256 = sha256_file(path)
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tokenizer.get_vocab_size()
    self.eot_id = self._tokenizer.token_to_id(EOT)
    if self.eot_id is None:
      raise ValueError(f"path={path!r}: the tokenizer has no {EOT} token.")

  def encode(self, text: str) -> np.ndarray:
    """Token ids ``[T]`` (int32) of ``text``; no end-of-text token is added."""
    return np.asarray(self._tokenizer.encode(text).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """``encode`` of each text, in parallel threads."""
    return [np.asarray(e.ids, np.int32) for e in self._tokenizer.encode_batch(list(texts))]

  def decode(self, ids) -> str:
    """The text of ``ids``; end-of-text tokens are kept as ``<|endoftext|>``."""
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                  skip_special_tokens=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str) -> Tokenizer:
  """Trains a byte-level BPE of ``vocab_size`` tokens on ``texts``, saves it to ``path``.

  ``vocab_size`` counts the 256 byte tokens and ``<|endoftext|>``; it must be in [257, 65536]
  (ids are stored as uint16).
  """
  if not isinstance(vocab_size, int) or not 257 <= vocab_size <= _MAX_UINT16_VOCAB:
    raise ValueError(f"vocab_size must be an int in [257, {_MAX_UINT16_VOCAB}], got {vocab_size=}.")
  bpe = tokenizers.Tokenizer(models.BPE())
  # GPT-2's pre-tokenisation regex on bytes; no prefix space, so decoding is the exact inverse.
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOT], show_progress=False, min_frequency=2,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(texts, trainer=trainer)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  bpe.save(tmp, pretty=False)
  os.replace(tmp, path)
  return Tokenizer(path)
