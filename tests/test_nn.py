"""sbjax.nn: StickBreakingAttention options, the softmax baselines, RoPE, the Linen bridge."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.sharding import PartitionSpec as P

import sbjax
from sbjax.nn import stick_breaking
from sbjax.nn import ATTENTIONS, SoftmaxAttention, StickBreakingAttention, apply_rope, make_attention
from sbjax.parallel import make_mesh
from helpers import rel_rms, stick_loop

D, N = 16, 4


def _rngs(seed=0):
  # RBG keys: threefry's random bits take ~1.5 s to compile per shape on a 2-core CPU.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _x(b=2, t=8, d=D, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, d)), dtype)


def _module(**options):
  options.setdefault("implementation", "xla")
  return StickBreakingAttention(in_features=D, num_heads=N, rngs=_rngs(), **options)


@nnx.jit
def _call(module, x, segment_ids=None):
  return module(x, segment_ids)


def _params_f64(module):
  return {k: np.asarray(v[...], np.float64) for k, v in nnx.state(module, nnx.Param).items()}


def test_top_level_export():
  assert sbjax.StickBreakingAttention is StickBreakingAttention


OPTIONS = [
    dict(remainder=r, head_norm=hn, use_bias=b, num_kv_heads=k, attend_current=ac)
    for (r, hn, b, k, ac) in [
        ("none", False, False, None, False), ("current", False, False, 2, False),
        ("bias", True, True, 1, False), ("current", True, False, 2, True),
    ]
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_shapes_and_finite_grads(options):
  module = _module(**options)
  x = _x()
  graphdef, params = nnx.split(module)

  def loss(p):
    y = nnx.merge(graphdef, p)(x)
    return jnp.sum(y**2), y

  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert np.isfinite(np.asarray(y)).all()
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  # Every parameter gets a gradient (the remainder bias and the head-norm scale included).
  assert all(np.abs(np.asarray(g)).sum() > 0 for g in leaves)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtype_and_param_dtype(dtype):
  module = _module(dtype=dtype, param_dtype=jnp.float32, remainder="bias", head_norm=True)
  y = _call(module, _x())
  assert y.dtype == dtype
  assert np.isfinite(np.asarray(y, np.float32)).all()
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("remainder,attend_current",
                         [("none", False), ("current", False), ("bias", False), ("current", True)])
def test_matches_float64_definition(remainder, attend_current):
  """The module equals projections + the stick-breaking loop + the remainder rule, in float64,
  with GQA (N=4 query heads on K=2 kv heads) and segments."""
  num_kv_heads, h = 2, 8
  module = _module(num_kv_heads=num_kv_heads, head_dim=h, remainder=remainder, head_norm=True,
                   attend_current=attend_current, use_bias=True)
  if remainder == "bias":  # a non-zero bias, so the test sees it
    module.remainder_bias[...] = jnp.asarray(np.random.default_rng(1).normal(size=(N, h)), jnp.float32)
  module.head_norm_scale[...] = jnp.asarray(
      np.random.default_rng(2).uniform(0.5, 2.0, size=(N, h)), jnp.float32)
  x = _x(b=2, t=7, seed=3)
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], jnp.int32)
  y = _call(module, x, seg)

  p, x64 = _params_f64(module), np.asarray(x, np.float64)
  q = np.einsum("BTD,DNH->BTNH", x64, p["query_kernel"]) + p["query_bias"]
  k = np.einsum("BTD,DKH->BTKH", x64, p["key_kernel"]) + p["key_bias"]
  v = np.einsum("BTD,DKH->BTKH", x64, p["value_kernel"]) + p["value_bias"]
  out, rem = stick_loop(q, k, v, 1 / math.sqrt(h), np.asarray(seg), attend_current)
  if remainder == "current":
    out = out + rem[..., None] * np.repeat(v, N // num_kv_heads, axis=2)
  elif remainder == "bias":
    out = out + rem[..., None] * p["remainder_bias"]
  out = out / np.sqrt(np.mean(out**2, -1, keepdims=True) + module.norm_eps) * p["head_norm_scale"]
  want = np.einsum("BTNH,NHD->BTD", out, p["out_kernel"]) + p["out_bias"]
  assert rel_rms(y, want) < 1e-5


def test_order_aware_without_position_embedding():
  """Permuting earlier tokens changes a later output for stick-breaking, and (the control) leaves
  it unchanged for softmax without position embedding."""
  x = _x(b=1, t=8)
  perm = jnp.asarray([3, 0, 6, 1, 5, 2, 4, 7])  # keeps the last token in place
  for name, order_aware in [("stickbreaking", True), ("softmax_nope", False)]:
    options = {"implementation": "xla"}
    module = make_attention(name, D, N, rngs=_rngs(), **options)
    last, last_perm = _call(module, x)[:, -1], _call(module, x[:, perm])[:, -1]
    assert np.isfinite(np.asarray(last)).all() and np.isfinite(np.asarray(last_perm)).all()
    assert (rel_rms(last_perm, last) > 1e-3) == order_aware, name


@pytest.mark.parametrize("name", ATTENTIONS)
def test_causal_and_segments(name):
  """Changing a later token or a token of another segment leaves an output unchanged."""
  options = {"implementation": "xla"}
  if name == "stickbreaking":
    options.update(remainder="current", head_norm=True)
  module = make_attention(name, D, N, rngs=_rngs(), num_kv_heads=2, **options)
  x = _x(b=1, t=8)
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 2, 2]], jnp.int32)
  y = _call(module, x, seg)
  y_future = _call(module, x.at[:, 5].add(1.0), seg)
  np.testing.assert_array_equal(np.asarray(y_future[:, :5]), np.asarray(y[:, :5]))
  y_other = _call(module, x.at[:, :3].add(1.0), seg)  # segment 0 changes; segments 1 and 2 cannot see it
  np.testing.assert_array_equal(np.asarray(y_other[:, 3:]), np.asarray(y[:, 3:]))
  assert rel_rms(y_other[:, :3], y[:, :3]) > 1e-3


def test_scan_implementation_matches_xla():
  x = _x(t=12)
  y_scan = _call(_module(implementation="scan", remainder="current", num_kv_heads=2), x)
  y_xla = _call(_module(implementation="xla", remainder="current", num_kv_heads=2), x)
  assert rel_rms(y_scan, y_xla) < 1e-5


def test_softmax_rope_matches_dense_definition():
  module = SoftmaxAttention(D, N, rngs=_rngs(), num_kv_heads=2, implementation="xla")
  x = _x(t=6)
  p, x64 = _params_f64(module), np.asarray(x, np.float64)
  q = np.einsum("BTD,DNH->BTNH", x64, p["query_kernel"])
  k = np.einsum("BTD,DKH->BTKH", x64, p["key_kernel"])
  v = np.einsum("BTD,DKH->BTKH", x64, p["value_kernel"])
  pos = np.arange(6)
  with jax.enable_x64(True):
    q, k = (np.asarray(apply_rope(jnp.asarray(a), jnp.asarray(pos))) for a in (q, k))
  k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
  logits = np.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(pos[:, None] >= pos[None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  want = np.einsum("BNTS,BSNH,NHD->BTD", weights, v, p["out_kernel"])
  assert rel_rms(_call(module, x), want) < 1e-5


def test_rope_depends_on_relative_position_only():
  q, k = np.random.default_rng(0).normal(size=(2, 1, 1, 1, 8)).astype(np.float32)
  def score(i, j):
    return jnp.sum(apply_rope(q, jnp.asarray([i])) * apply_rope(k, jnp.asarray([j])))
  assert np.isfinite(float(score(5, 2)))
  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
  assert abs(float(score(5, 2) - score(5, 3))) > 1e-3


def test_sharding_annotations():
  module = _module(num_kv_heads=2, remainder="bias", head_norm=True, use_bias=True)
  specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
  want = {"query_kernel": P(None, "model", None), "key_kernel": P(None, "model", None),
          "value_kernel": P(None, "model", None), "out_kernel": P("model", None, None),
          "query_bias": P("model", None), "remainder_bias": P("model", None),
          "head_norm_scale": P("model", None), "out_bias": P(None)}
  for name, spec in want.items():
    assert specs[name].get_value() == spec, name


@pytest.mark.parametrize("name", ATTENTIONS)
def test_builds_and_runs_plainly(name):
  """No mesh, no context, default Rngs: as ``nnx.MultiHeadAttention(4, 32, rngs=nnx.Rngs(0))``."""
  module = make_attention(name, 32, 4, rngs=nnx.Rngs(0))
  y = module(_x(d=32))
  assert y.shape == (2, 8, 32) and np.isfinite(np.asarray(y)).all()
  kernel = module.query_kernel[...]
  assert len(kernel.devices()) == 1 and nnx.get_partition_spec(
      nnx.state(module, nnx.Param))["query_kernel"].get_value() == P(None, "model", None)


def test_top_level_module_builds_plainly():
  y = sbjax.StickBreakingAttention(32, 4, rngs=nnx.Rngs(0))(_x(d=32))
  assert y.shape == (2, 8, 32) and np.isfinite(np.asarray(y)).all()


def test_mesh_places_parameters_by_their_annotations():
  with jax.set_mesh(make_mesh(1, 1)):
    module = _module(remainder="bias")
  for name, spec in [("query_kernel", P(None, "model", None)), ("out_kernel", P("model", None, None)),
                     ("remainder_bias", P("model", None))]:
    sharding = getattr(module, name)[...].sharding
    assert isinstance(sharding, jax.sharding.NamedSharding) and sharding.spec == spec, name
  # A mesh without a "model" axis cannot place them: the module still builds, unplaced.
  data_only = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",),
                                axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(data_only):
    module = _module()
  assert module.query_kernel[...].sharding.is_fully_replicated


def test_block_sizes_reach_the_op(monkeypatch):
  seen = []
  def spy(*args, **kwargs):
    seen.append(kwargs.get("block_sizes"))
    return stick_breaking.stick_breaking_attention.__wrapped__(*args, **kwargs)
  spy.__wrapped__ = sbjax.stick_breaking_attention
  monkeypatch.setattr(stick_breaking, "stick_breaking_attention", spy)
  blocks = sbjax.BlockSizes(block_q=32, block_k=16)
  _module(implementation=None, block_sizes=blocks)(_x())
  assert seen == [blocks]
  with pytest.raises(TypeError, match="block_sizes"):
    _module(block_sizes={"block_q": 32})


def test_linen_bridge():
  def bridged():
    return nnx.bridge.to_linen(StickBreakingAttention, in_features=D, num_heads=N,
                               num_kv_heads=2, remainder="bias", implementation="xla")

  x = _x()
  variables = jax.jit(bridged().init)(jax.random.key(0, impl="rbg"), x)
  assert linen.meta.unbox(variables)["params"]["query_kernel"].shape == (D, N, D // N)
  y = jax.jit(bridged().apply)(variables, x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()

  class Wrapper(linen.Module):  # used as a submodule of a Linen model, and differentiable
    @linen.compact
    def __call__(self, x):
      return linen.Dense(D)(bridged()(x))

  wrapper_vars = jax.jit(Wrapper().init)(jax.random.key(1, impl="rbg"), x)
  grads = jax.jit(jax.grad(lambda v: jnp.sum(Wrapper().apply(v, x) ** 2)))(wrapper_vars)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


BAD_ARGS = [
    (dict(num_heads=0), "num_heads"), (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(in_features=15), "in_features"), (dict(head_dim=-1), "head_dim"),
    (dict(remainder="rest"), "remainder"), (dict(implementation="cuda"), "implementation"),
    (dict(implementation="scan", interpret=True), "interpret applies to the Pallas"),
]


@pytest.mark.parametrize("changes,name", BAD_ARGS, ids=[n for _, n in BAD_ARGS])
def test_bad_arguments_name_the_argument(changes, name):
  kwargs = dict(in_features=D, num_heads=N, rngs=_rngs()) | changes
  with pytest.raises(ValueError, match=name):
    StickBreakingAttention(**kwargs)


def test_bad_inputs_and_baseline_arguments():
  with pytest.raises(ValueError, match="x must have shape"):
    _module()(_x(d=D + 1))
  with pytest.raises(ValueError, match="segment_ids"):
    _module()(_x(), jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match="position_embedding"):
    SoftmaxAttention(D, N, rngs=_rngs(), position_embedding="alibi")
  with pytest.raises(ValueError, match="attention"):
    make_attention("linear", D, N, rngs=_rngs())


@pytest.mark.parametrize("name,k", list(itertools.product(ATTENTIONS[1:], [None, 1])))
def test_softmax_baselines_shapes(name, k):
  module = make_attention(name, D, N, rngs=_rngs(), num_kv_heads=k, dtype=jnp.bfloat16)
  y = _call(module, _x())
  assert y.shape == (2, 8, D) and y.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y, np.float32)).all()


def test_forget_gate_matches_float64_definition():
  """With the gate, the module is projections + the gated stick loop (GQA, segments)."""
  module = _module(num_kv_heads=2, head_dim=8, forget_gate=True)
  rng = np.random.default_rng(4)
  module.forget_kernel[...] = jnp.asarray(rng.normal(size=(D, 2)), jnp.float32)  # key-dependent f
  module.forget_bias[...] = jnp.asarray([1.0, -1.0], jnp.float32)
  x = _x(b=2, t=7, seed=5)
  seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], jnp.int32)
  y = _call(module, x, seg)
  p, x64 = _params_f64(module), np.asarray(x, np.float64)
  q = np.einsum("BTD,DNH->BTNH", x64, p["query_kernel"])
  k = np.einsum("BTD,DKH->BTKH", x64, p["key_kernel"])
  v = np.einsum("BTD,DKH->BTKH", x64, p["value_kernel"])
  gate = np.einsum("BTD,DK->BTK", x64, p["forget_kernel"]) + p["forget_bias"]
  out, _ = stick_loop(q, k, v, 1 / math.sqrt(8), np.asarray(seg), forget_gate=gate)
  want = np.einsum("BTNH,NHD->BTD", out, p["out_kernel"])
  assert rel_rms(y, want) < 1e-5
  ungated, _ = stick_loop(q, k, v, 1 / math.sqrt(8), np.asarray(seg))
  assert rel_rms(np.einsum("BTNH,NHD->BTD", ungated, p["out_kernel"]), want) > 1e-2  # the gate acts


def test_forget_gate_aux_loss_is_sown_and_trained():
  """The sparsity loss weight * mean(f) is sown, and the train step adds it to the loss."""
  from sbjax import models, training
  module = _module(forget_gate=True, forget_gate_loss_weight=0.5, forget_gate_bias_init=0.0)
  _, sown = nnx.capture(module, nnx.Intermediate)(_x())
  (aux,) = jax.tree.leaves(sown)
  np.testing.assert_allclose(float(aux), 0.5 * 0.5, rtol=1e-6)  # f = sigmoid(0)
  with pytest.raises(ValueError, match="forget_gate_loss_weight"):
    _module(forget_gate_loss_weight=0.1)

  config = models.lm_config("tiny", num_layers=2, forget_gate=True, forget_gate_loss_weight=0.1,
                            implementation="xla")
  model = models.DecoderLM(config, rngs=nnx.Rngs(0))
  mesh = make_mesh(1, 1)
  tx = training.make_optimizer(training.TrainConfig(num_steps=2, warmup_steps=0))
  graphdef, rest, state, shardings = training.init_train_state(model, tx, mesh)
  step = training.make_train_step(graphdef, rest, tx, mesh, shardings)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
  state, metrics = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  # Two layers, each 0.1 * mean(sigmoid(4)) at initialisation (the gate's kernel starts at 0).
  np.testing.assert_allclose(float(metrics["aux_loss"]), 2 * 0.1 * (1 / (1 + np.exp(-4.0))), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]),
                             float(metrics["cross_entropy"]) + float(metrics["aux_loss"]), rtol=1e-6)
