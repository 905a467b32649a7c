"""The MQRAR mechanism analysis (experiments/mqrar_attention.py): the weights are the ones the
model applies, and the recency share on cases whose answer is known."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbjax import models
from sbjax.common import stick_breaking_weights, visible_mask

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))
import mqrar_attention  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("attention", ["stickbreaking", "softmax_rope", "softmax_nope"])
def test_weights_reproduce_every_layers_output(attention, x64):
  """Weights times values, through the output kernel, give each attention layer's output (float64:
  the two sides differ only by summation order, ~1e-16)."""
  config = models.LMConfig(vocab_size=16, num_layers=2, d_model=16, num_heads=4, num_kv_heads=2,
                           mlp_dim=16, attention=attention, implementation="xla",
                           softmax_implementation="xla", dtype="float64", param_dtype="float64")
  model = models.DecoderLM(config, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 12)))
  weights = mqrar_attention.attention_weights(model, tokens)
  assert weights.shape == (2, 2, 4, 12, 12) and weights.dtype == jnp.float64
  x = model.embedding[...][tokens]
  for layer, block in enumerate(model.blocks):
    h = block.attention_norm(x)
    attn = block.attention
    value = jnp.einsum("BTD,DKH->BTKH", h, attn.value_kernel[...]).repeat(2, axis=2)  # [B,T,N,H]
    out = jnp.einsum("BNTS,BSNH->BTNH", weights[layer], value)
    want = attn(h)
    got = jnp.einsum("BTNH,NHD->BTD", out, attn.out_kernel[...])
    assert np.isfinite(want).all() and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    x = block(x)
  rows = weights.sum(-1)
  if attention == "stickbreaking":  # rows sum to 1 - remainder; the first query sees nothing
    assert (rows <= 1 + 1e-12).all() and (rows[..., 0] == 0).all()
  else:  # softmax rows are computed in float32, as jax.nn.dot_product_attention does
    np.testing.assert_allclose(rows, 1.0, atol=4 * np.finfo(np.float32).eps)


# Keys A B (tokens 0, 1), values 10-13. Pairs: A B A A  -> the last A has two earlier A's.
_TOKENS = np.array([[0, 10, 1, 11, 0, 12, 0, 13]])


def test_recency_share_of_constructed_weights():
  recent, older, n_prev = mqrar_attention.assignment_masks(jnp.asarray(_TOKENS))
  np.testing.assert_array_equal(n_prev, [[0, 0, 1, 2]])
  np.testing.assert_array_equal(recent[0, 3], [0, 0, 0, 0, 1, 1, 0, 0])  # pair 2: positions 4, 5
  np.testing.assert_array_equal(older[0, 3], [1, 1, 0, 0, 0, 0, 0, 0])  # pair 0
  np.testing.assert_array_equal(recent[0, 2], [1, 1, 0, 0, 0, 0, 0, 0])  # pair 0 for pair 2
  weights = np.zeros((1, 2, 8, 8))  # [B, N, T, S]
  # Head 0 at the last key (position 6): 0.6 on the recent A pair, 0.2 on the older, 0.2 on B.
  weights[0, 0, 6, [5, 4, 1, 3]] = [0.5, 0.1, 0.2, 0.2]
  weights[0, 0, 4, 1] = 1.0  # pair 2's A has one earlier A only: not counted
  weights[0, 1, 6, 3] = 1.0  # head 1 looks at B only: no key-match weight
  sums = mqrar_attention.recency_sums(jnp.asarray(weights), jnp.asarray(_TOKENS))
  assert int(sums["queries"]) == 1
  np.testing.assert_allclose(sums["recent"], [0.6, 0.0])
  np.testing.assert_allclose(sums["older"], [0.2, 0.0])
  summary = mqrar_attention.recency_summary(sums)
  np.testing.assert_allclose(summary["share"][0], 0.75)
  assert np.isnan(summary["share"][1])
  np.testing.assert_allclose(summary["match"], [0.8, 0.0])
  assert summary["uniform"] == 0.5


def test_stick_breaking_takes_the_latest_assignment_and_softmax_spreads():
  """Idealised retrieval heads whose logit is +c at the queried key's value positions and -c
  elsewhere: stick-breaking's weight goes to the nearest match (share sigma(c)-close to 1),
  softmax's equally to every match (share = the uniform level)."""
  rng = np.random.default_rng(0)
  keys = rng.integers(0, 3, (4, 32))  # 3 keys, 32 pairs: many repeats
  tokens = np.stack([keys, 10 + rng.integers(0, 5, keys.shape)], -1).reshape(4, 64)
  c = 12.0
  match = (tokens[:, None, :] == tokens[:, :, None]) & (np.arange(64) % 2 == 0)[None, None, :]
  match = np.roll(match, 1, axis=-1)  # the value right after each matching key
  match[..., 0] = False
  logits = jnp.asarray(np.where(match, c, -c))[:, None]  # [B, 1, T, S]
  pos = jnp.arange(64)
  sb, _ = stick_breaking_weights(logits, visible_mask(pos, pos, attend_current=False))
  soft = jax.nn.softmax(jnp.where(visible_mask(pos, pos, attend_current=True), logits, -jnp.inf))
  sb, soft = (mqrar_attention.recency_summary(mqrar_attention.recency_sums(w, tokens))
              for w in (sb, soft))
  assert sb["share"][0] > 0.999 and sb["match"][0] > 0.999
  # Off the matches softmax keeps e^-2c of the weight: float32 rounding is all that is left.
  np.testing.assert_allclose(soft["share"][0], soft["uniform"], rtol=1e-6)
  assert soft["uniform"] < 0.3  # 2 to ~15 earlier assignments per query
