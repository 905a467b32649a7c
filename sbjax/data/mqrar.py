"""Multi-Query Repeated Associative Recall (MQRAR): the synthetic task of Tan et al. (ICLR 2025).

Zoology's MQAR (Arora et al., 2023) with keys that are reassigned. A sequence is ``T / 2``
interleaved key-value pairs ``k v k v ...``: keys come from the lower half of the vocabulary,
values from the upper half. The first ``num_keys`` pairs assign each of the sequence's keys a
value; every later pair names one of those keys again, and with probability ``reassign_prob``
gives it a new value (else it repeats the one it holds). Whenever a key reappears, the model must
output, AT THE KEY'S POSITION, the value the key held most recently before::

  inputs   B 6 P 4 E 3 X 1 Z 2 E 2 B 1 E 5 B 4
  targets  . . . . . . . . . . 3 . 6 . 2 . 1 .      (loss only where a target is shown)

Everything is NumPy and generated on the fly, deterministic by seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
  """One batch. ``inputs``, ``targets`` ``[B, T]`` int32; ``loss_mask`` ``[B, T]`` bool."""

  inputs: np.ndarray
  targets: np.ndarray
  loss_mask: np.ndarray


def recall_targets(tokens) -> tuple[np.ndarray, np.ndarray]:
  """Targets of any sequence of interleaved key-value pairs.

  Args:
    tokens: ``[..., T]`` array (any dtype whose values compare and sort, e.g. ints or strings),
      ``T`` even; ``tokens[..., 0::2]`` are keys, ``tokens[..., 1::2]`` their values.

  Returns:
    ``(targets, loss_mask)``, both ``[..., T]``: at each key position whose key occurred before,
    ``loss_mask`` is True and ``targets`` holds the value that key was given at its most recent
    earlier occurrence; elsewhere ``loss_mask`` is False and ``targets`` is zero (or ``''``).
  """
  tokens = np.asarray(tokens)
  if tokens.ndim < 1 or tokens.shape[-1] % 2:
    raise ValueError(f"tokens must be [..., T] with T even (key-value pairs), got {tokens.shape=}.")
  keys, values = tokens[..., 0::2], tokens[..., 1::2]  # [..., P] each, P = T / 2
  # A stable sort by key keeps each key's occurrences in time order, so an occurrence's
  # predecessor in sorted order is the same key's previous occurrence, if the keys match.
  order = np.argsort(keys, axis=-1, kind="stable")  # [..., P]
  sorted_keys = np.take_along_axis(keys, order, axis=-1)
  repeat = sorted_keys[..., 1:] == sorted_keys[..., :-1]  # [..., P - 1]
  pair_targets = np.zeros_like(values)
  pair_mask = np.zeros(keys.shape, bool)
  previous_values = np.take_along_axis(values, order[..., :-1], axis=-1)
  np.put_along_axis(pair_targets, order[..., 1:],
                    np.where(repeat, previous_values, pair_targets[..., :1]), axis=-1)
  np.put_along_axis(pair_mask, order[..., 1:], repeat, axis=-1)
  targets = np.zeros_like(tokens)
  loss_mask = np.zeros(tokens.shape, bool)
  targets[..., 0::2] = pair_targets
  loss_mask[..., 0::2] = pair_mask
  return targets, loss_mask


def check_args(*, batch_size: int, seq_len: int, vocab_size: int, num_keys: int,
               reassign_prob: float) -> None:
  """Raises ``ValueError`` naming the first bad argument."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size=}.")
  if vocab_size < 4 or vocab_size % 2:
    raise ValueError(f"vocab_size must be even and at least 4 (half keys, half values), "
                     f"got {vocab_size=}.")
  if not 1 <= num_keys <= vocab_size // 2:
    raise ValueError(f"num_keys must be in [1, vocab_size // 2 = {vocab_size // 2}], "
                     f"got {num_keys=}.")
  if seq_len % 2 or seq_len < 2 * num_keys + 2:
    raise ValueError(f"seq_len must be even and at least 2 * num_keys + 2 = {2 * num_keys + 2} "
                     f"(the assignments plus one query), got {seq_len=}.")
  if not 0.0 <= reassign_prob <= 1.0:
    raise ValueError(f"reassign_prob must be in [0, 1], got {reassign_prob=}.")


def make_batch(rng: np.random.Generator, *, batch_size: int, seq_len: int, vocab_size: int,
               num_keys: int, reassign_prob: float) -> Batch:
  """Draws one batch of MQRAR sequences.

  Args:
    rng: the NumPy generator the batch is drawn from (the only source of randomness).
    batch_size: B.
    seq_len: T, even; the sequence holds ``T / 2`` key-value pairs.
    vocab_size: V, even; keys are tokens ``[0, V/2)``, values ``[V/2, V)``.
    num_keys: keys per sequence, drawn without replacement; the first ``num_keys`` pairs assign
      each of them once, in random order.
    reassign_prob: chance that a later pair gives its key a new value (different from the one it
      holds) rather than repeating the current one. 0 is plain MQAR with repeats; 1 reassigns
      every time, so only the most recent assignment answers a query.

  Returns:
    A ``Batch`` of ``[B, T]`` arrays; the loss mask covers the ``T / 2 - num_keys`` queries.
  """
  check_args(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size, num_keys=num_keys,
             reassign_prob=reassign_prob)
  half = vocab_size // 2
  num_pairs = seq_len // 2
  b = np.arange(batch_size)[:, None]
  # Each row's keys: the first num_keys of a random permutation of the key vocabulary.
  key_set = np.argsort(rng.random((batch_size, half)), axis=-1)[:, :num_keys]  # [B, num_keys]
  slots = np.concatenate([  # [B, P]: which of the row's keys each pair names
      np.argsort(rng.random((batch_size, num_keys)), axis=-1),
      rng.integers(0, num_keys, (batch_size, num_pairs - num_keys))], axis=-1)
  current = rng.integers(0, half, (batch_size, num_keys))  # value (minus half) each key holds
  reassign = rng.random((batch_size, num_pairs)) < reassign_prob
  # A shift in [1, half) mod half makes a reassigned value always differ from the held one.
  shift = rng.integers(1, max(half, 2), (batch_size, num_pairs))
  values = np.empty((batch_size, num_pairs), np.int64)
  values[:, :num_keys] = np.take_along_axis(current, slots[:, :num_keys], axis=-1)
  for p in range(num_keys, num_pairs):  # sequential: a value depends on the key's history
    slot = slots[:, p]
    new = np.where(reassign[:, p], (current[b[:, 0], slot] + shift[:, p]) % half,
                   current[b[:, 0], slot])
    current[b[:, 0], slot] = new
    values[:, p] = new
  inputs = np.empty((batch_size, seq_len), np.int32)
  inputs[:, 0::2] = np.take_along_axis(key_set, slots, axis=-1)
  inputs[:, 1::2] = values + half
  targets, loss_mask = recall_targets(inputs)
  return Batch(inputs=inputs, targets=targets, loss_mask=loss_mask)


def batches(seed: int, **kwargs) -> Iterator[Batch]:
  """Endless stream of ``make_batch(rng, **kwargs)`` from ``np.random.default_rng(seed)``."""
  check_args(**kwargs)
  rng = np.random.default_rng(seed)
  while True:
    yield make_batch(rng, **kwargs)
