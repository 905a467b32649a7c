"""sbjax.models: the decoder LM's shapes, sizes, causality and that its loss falls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sbjax.models import DecoderLM, LMConfig, count_params, lm_config
from sbjax.nn import ATTENTIONS


def test_builds_plainly_and_under_a_mesh():
  """No mesh, no context (as a user's first line); under a mesh the parameters are placed."""
  from sbjax.parallel import make_mesh
  config = lm_config("tiny", num_layers=1)
  logits = DecoderLM(config, rngs=nnx.Rngs(0))(jnp.ones((1, 4), jnp.int32))
  assert logits.shape == (1, 4, config.vocab_size) and np.isfinite(np.asarray(logits)).all()
  with jax.set_mesh(make_mesh(1, 1)):
    model = DecoderLM(config, rngs=nnx.Rngs(0))
  assert model.embedding[...].sharding.spec == jax.sharding.PartitionSpec("model", None)


def _lm(**overrides):
  overrides.setdefault("implementation", "xla")
  # RBG keys: threefry's random bits take ~1.5 s to compile per shape on a 2-core CPU.
  return DecoderLM(lm_config("tiny", **overrides), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def _tokens(b=2, t=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, size=(b, t)), jnp.int32)


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_shapes_dtypes_and_causality(attention):
  model = _lm(attention=attention, dtype="bfloat16", num_kv_heads=2)
  tokens = _tokens()
  logits = _logits(model, tokens)
  assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  changed = _logits(model, tokens.at[:, 7].set((tokens[:, 7] + 1) % 256))
  np.testing.assert_array_equal(np.asarray(changed[:, :7]), np.asarray(logits[:, :7]))
  assert not np.array_equal(np.asarray(changed[:, 7:]), np.asarray(logits[:, 7:]))


@pytest.mark.parametrize("name,millions", [("125m", 123.6), ("350m", 359.8)])
def test_preset_sizes(name, millions):
  model = nnx.eval_shape(lambda: DecoderLM(lm_config(name), rngs=nnx.Rngs(0)))
  assert abs(count_params(model) / 1e6 - millions) < 0.1


def test_tied_and_untied_embeddings():
  tied, untied = _lm(), _lm(tie_embeddings=False)
  assert tied.output_kernel is None and untied.output_kernel[...].shape == (64, 256)
  assert count_params(untied) - count_params(tied) == 64 * 256


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="attention"):
    LMConfig(attention="linear")
  with pytest.raises(ValueError, match="num_layers"):
    LMConfig(num_layers=0)
  with pytest.raises(ValueError, match="name"):
    lm_config("7b")


@pytest.mark.parametrize("attention,remat", [("stickbreaking", True), ("softmax_rope", False)])
def test_loss_falls_on_a_toy_batch(attention, remat):
  model = _lm(attention=attention, remat=remat, remainder="bias", head_norm=True)
  tokens = _tokens(b=4, t=17, seed=1)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  tx = optax.adamw(1e-2)
  graphdef, params = nnx.split(model, nnx.Param)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(8):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses
