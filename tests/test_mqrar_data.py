"""Properties of the MQRAR generator (sbjax/data/mqrar.py)."""

import numpy as np
import pytest

from sbjax.data import mqrar

ARGS = dict(batch_size=8, seq_len=64, vocab_size=32, num_keys=6, reassign_prob=0.7)


def _brute_force_targets(row):
  """The most recent previous value of each key, by walking the pairs in order."""
  held, targets, mask = {}, np.zeros_like(row), np.zeros(row.shape, bool)
  for t in range(0, len(row), 2):
    key, value = row[t], row[t + 1]
    if key in held:
      targets[t], mask[t] = held[key], True
    held[key] = value
  return targets, mask


def test_slides_example_exactly():
  tokens = "B 6 P 4 E 3 X 1 Z 2 E 2 B 1 E 5 B 4".split()
  expected = ". . . . . . . . . . 3 . 6 . 2 . 1 .".split()  # the slides' output row, phi as "."
  targets, mask = mqrar.recall_targets(tokens)
  np.testing.assert_array_equal(mask, [e != "." for e in expected])
  np.testing.assert_array_equal(targets[mask], [e for e in expected if e != "."])


@pytest.mark.parametrize("reassign_prob", [0.0, 0.5, 1.0])
def test_every_target_is_the_most_recent_previous_value(reassign_prob):
  batch = mqrar.make_batch(np.random.default_rng(1), **{**ARGS, "reassign_prob": reassign_prob})
  for row, targets, mask in zip(batch.inputs, batch.targets, batch.loss_mask):
    want_targets, want_mask = _brute_force_targets(row)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(targets, want_targets)


def test_layout_and_mask():
  batch = mqrar.make_batch(np.random.default_rng(2), **ARGS)
  b, t, half, k = ARGS["batch_size"], ARGS["seq_len"], ARGS["vocab_size"] // 2, ARGS["num_keys"]
  for x in (batch.inputs, batch.targets, batch.loss_mask):
    assert x.shape == (b, t)
  assert batch.inputs.dtype == batch.targets.dtype == np.int32 and batch.loss_mask.dtype == bool
  keys, values = batch.inputs[:, 0::2], batch.inputs[:, 1::2]
  assert ((keys >= 0) & (keys < half)).all() and ((values >= half) & (values < 2 * half)).all()
  for row in keys:  # the first num_keys pairs assign num_keys distinct keys; no others appear
    assert len(set(row[:k])) == k and set(row) == set(row[:k])
  # Loss exactly at the key positions after the initial assignments; never at values.
  want = np.zeros((b, t), bool)
  want[:, 2 * k::2] = True
  np.testing.assert_array_equal(batch.loss_mask, want)
  assert (batch.targets[~batch.loss_mask] == 0).all()
  assert ((batch.targets[batch.loss_mask] >= half)).all()


def test_reassign_prob_sets_how_often_values_change():
  def changed_fraction(p):
    batch = mqrar.make_batch(np.random.default_rng(3), **{**ARGS, "batch_size": 64,
                                                           "reassign_prob": p})
    queries = batch.loss_mask
    # The value given right after a query differs from the held one (the target) iff reassigned.
    return np.mean(batch.inputs[:, 1:][queries[:, :-1]] != batch.targets[queries])

  assert changed_fraction(0.0) == 0.0
  assert changed_fraction(1.0) == 1.0
  assert abs(changed_fraction(0.3) - 0.3) < 0.05


def test_deterministic_by_seed():
  first = [next(s) for s in [mqrar.batches(7, **ARGS)] for _ in range(3)]
  again = [next(s) for s in [mqrar.batches(7, **ARGS)] for _ in range(3)]
  other = next(mqrar.batches(8, **ARGS))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
  assert not np.array_equal(first[0].inputs, first[1].inputs)
  assert not np.array_equal(first[0].inputs, other.inputs)


@pytest.mark.parametrize("bad, match", [
    (dict(vocab_size=31), "vocab_size"),
    (dict(num_keys=17), "num_keys"),
    (dict(num_keys=0), "num_keys"),
    (dict(seq_len=13), "seq_len"),
    (dict(seq_len=12), "seq_len"),
    (dict(reassign_prob=1.5), "reassign_prob"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_are_named(bad, match):
  with pytest.raises(ValueError, match=match):
    mqrar.make_batch(np.random.default_rng(0), **{**ARGS, **bad})


def test_recall_targets_rejects_odd_length():
  with pytest.raises(ValueError, match="tokens"):
    mqrar.recall_targets(np.zeros((2, 5), int))
