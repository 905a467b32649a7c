"""The public API's contract: argument checks, dtypes, implementation choice, traced scale, cost."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sbjax
from helpers import Shape, random_inputs

Q, K, V, _ = random_inputs(0, Shape(2, 8, 4, 2, 16), jnp.float32)
SEG = jnp.zeros((2, 8), jnp.int32)

BAD_INPUTS = [  # (kwargs overriding a valid call, error type, message fragment)
    (dict(query=Q[0]), ValueError, r"query must have rank 4 .* got query.shape=\(8, 4, 16\)"),
    (dict(query=Q[:, :0], key=K[:, :0], value=V[:, :0], segment_ids=None), ValueError,
     r"query must have no empty axis, got query.shape=\(2, 0, 4, 16\)"),
    (dict(key=K[..., None]), ValueError, r"key must have rank 4"),
    (dict(value=np.zeros(3)), ValueError, r"value must have rank 4"),
    (dict(query=[[1.0]]), TypeError, r"query must be an array, got list"),
    (dict(query=Q.astype(jnp.int32)), TypeError, r"query must have a floating dtype, got query.dtype=int32"),
    (dict(key=K.astype(jnp.bfloat16)), TypeError, r"share a dtype.*key.dtype=bfloat16"),
    (dict(key=K[:1], value=V[:1]), ValueError, r"share batch and length"),
    (dict(value=V[:, :4]), ValueError, r"share batch and length"),
    (dict(key=K[..., :8]), ValueError, r"key head_dim must equal query's"),
    (dict(value=V[:, :, :1]), ValueError, r"value must have as many heads as key"),
    (dict(query=jnp.concatenate([Q, Q[:, :, :1]], 2)), ValueError,
     r"multiple of key/value heads, got N=5 query heads and K=2"),
    (dict(segment_ids=SEG[0]), ValueError, r"segment_ids must have shape \[B, T\]=\(2, 8\), got \(8,\)"),
    (dict(segment_ids=SEG.astype(jnp.float32)), TypeError, r"segment_ids must have an integer dtype"),
    (dict(segment_ids=[[0] * 8] * 2), TypeError, r"segment_ids must be an array, got list"),
    (dict(forget_gate=[[0.0] * 2] * 8), TypeError, r"forget_gate must be an array, got list"),
    (dict(forget_gate=jnp.zeros((2, 8, 4))), ValueError,
     r"forget_gate must have shape \[B, T, K\]=\(2, 8, 2\), got forget_gate.shape=\(2, 8, 4\)"),
    (dict(forget_gate=jnp.zeros((2, 8, 2), jnp.int32)), TypeError,
     r"forget_gate must have a floating dtype, got forget_gate.dtype=int32"),
    (dict(scale=jnp.ones(2)), ValueError, r"scale must be a scalar, got scale.shape=\(2,\)"),
    (dict(scale="0.5"), TypeError, r"scale must be a Python float or a scalar array, got '0.5'"),
    (dict(scale=True), TypeError, r"scale must be a Python float or a scalar array, got True"),
    (dict(implementation="triton"), ValueError, r"implementation must be None or one of .*'triton'"),
    (dict(implementation="scan", block_sizes=sbjax.BlockSizes()), ValueError,
     r"block_sizes applies to the Pallas kernels only"),
    (dict(implementation="xla", interpret=True), ValueError,
     r"interpret applies to the Pallas kernels only"),
    (dict(block_sizes={"block_q": 16}), TypeError, r"block_sizes must be a sbjax.BlockSizes, got dict"),
    (dict(implementation="pallas", query=Q[..., None].repeat(32, -1).reshape(2, 8, 4, 512),
          key=K[..., None].repeat(32, -1).reshape(2, 8, 2, 512),
          value=V[..., None].repeat(32, -1).reshape(2, 8, 2, 512)), ValueError,
     r"implementation='pallas' supports head dims up to 256, got query.shape=\(2, 8, 4, 512\)"),
]


@pytest.mark.parametrize("override,error,match", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_bad_input_raises_before_computing(override, error, match):
  args = dict(query=Q, key=K, value=V, segment_ids=SEG)
  args.update(override)
  with pytest.raises(error, match=match):
    sbjax.stick_breaking_attention(
        args.pop("query"), args.pop("key"), args.pop("value"), **args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_output_dtypes_and_shapes(dtype):
  q, k, v, _ = random_inputs(1, Shape(1, 5, 4, 1, 8, hv=6), dtype)
  out = sbjax.stick_breaking_attention(q, k, v)
  out2, rem = sbjax.stick_breaking_attention(q, k, v, return_remainder=True)
  assert out.shape == (1, 5, 4, 6) and out.dtype == dtype
  assert rem.shape == (1, 5, 4) and rem.dtype == jnp.float32
  np.testing.assert_array_equal(out, out2)


def test_pallas_off_gpu_needs_interpret():
  """On a CPU the kernels run only interpreted: said in sbjax's words, before any work."""
  if jax.default_backend() == "gpu":
    pytest.skip("checks the CPU message")
  with pytest.raises(ValueError, match=r"implementation='pallas' needs an NVIDIA GPU or "
                                       r"interpret=True, got interpret=False with JAX's default "
                                       r"device 'cpu'.*use implementation='scan'"):
    sbjax.stick_breaking_attention(Q, K, V, implementation="pallas")


def test_pallas_triton_forces_the_triton_kernels():
  """``"pallas"`` picks the fastest Pallas kernels for the GPU (today the Triton ones);
  ``"pallas_triton"`` forces them: the same values and gradients, and the same input checks."""
  q, k, v, _ = random_inputs(4, Shape(1, 40, 4, 2, 16), jnp.bfloat16)
  block = sbjax.BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_bwd=16, block_q_dkv=16)
  loss = lambda impl: lambda q, k, v: jnp.sum(sbjax.stick_breaking_attention(
      q, k, v, implementation=impl, interpret=True, block_sizes=block).astype(jnp.float32) ** 2)
  grads = {impl: jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
           for impl in ("pallas", "pallas_triton")}
  assert np.isfinite(float(grads["pallas"][0]))
  for a, b in zip(jax.tree.leaves(grads["pallas"]), jax.tree.leaves(grads["pallas_triton"])):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  with pytest.raises(ValueError, match="implementation='pallas_triton' supports head dims up to 256"):
    sbjax.stick_breaking_attention(*[jnp.zeros((1, 8, 2, 512), jnp.bfloat16)] * 3,
                                   implementation="pallas_triton", interpret=True)


def test_default_implementation_off_gpu_is_scan():
  if jax.default_backend() == "gpu":
    pytest.skip("checks the CPU default")
  assert sbjax.ops.default_implementation() == "scan"


def test_default_scale_is_inverse_sqrt_head_dim():
  q, k, v, _ = random_inputs(2, Shape(1, 6, 2, 2, 16), jnp.float32)
  np.testing.assert_array_equal(
      sbjax.stick_breaking_attention(q, k, v),
      sbjax.stick_breaking_attention(q, k, v, scale=0.25))


def test_traced_scale_does_not_recompile_and_is_differentiable():
  q, k, v, _ = random_inputs(3, Shape(1, 6, 2, 1, 8), jnp.float32)
  traces = []

  @jax.jit
  def loss(scale):
    traces.append(None)
    return jnp.sum(sbjax.stick_breaking_attention(q, k, v, scale=scale) ** 2)

  a, b = loss(jnp.float32(0.5)), loss(jnp.float32(2.0))
  assert len(traces) == 1 and a != b
  g = jax.grad(loss)(jnp.float32(0.5))
  eps = 1e-3
  fd = (loss(jnp.float32(0.5 + eps)) - loss(jnp.float32(0.5 - eps))) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-2)


def _compiled_cost(fn, *shapes):
  """``(flops, temp bytes)`` of ``jax.jit(fn)`` compiled for ``shapes``. XLA's cost analysis counts
  a while loop's body once, so flops are multiplied by the loop's known trip count."""
  compiled = jax.jit(fn).lower(*shapes).compile()
  trips = [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', compiled.as_text())]
  assert len(trips) <= 1, trips  # one lax.map over query blocks, or none (a single block)
  return (compiled.cost_analysis()["flops"] * (trips[0] if trips else 1),
          compiled.memory_analysis().temp_size_in_bytes)


def test_scan_cost_grows_smoothly_with_length():
  """One more query must not pad the scan path up to whole extra blocks (issue: T=8193 cost as
  much as 10240 queries, T=5000 as much as 8192)."""
  sd, t = jax.ShapeDtypeStruct, 8192  # two blocks of 4096 queries at B=1, N=4

  def cost(t):
    q, kv = sd((1, t, 4, 64), jnp.float32), sd((1, t, 1, 64), jnp.float32)
    return _compiled_cost(lambda q, k, v: sbjax.stick_breaking_attention(
        q, k, v, implementation="scan"), q, kv, kv)

  (flops, temp), (flops1, temp1) = cost(t), cost(t + 1)
  assert flops1 / flops < 1.01 * ((t + 1) / t) ** 2, (flops, flops1)
  assert temp1 / temp < 1.01 * (t + 1) / t, (temp, temp1)


def test_testing_comparisons():
  """sbjax.testing's comparisons fail loudly: non-finite values, mismatched shapes, NaN where the
  reference has none, and every output over its bound by name."""
  from sbjax import testing
  tree, ref_tree = {"a": np.ones(3), "b": [np.ones(2)]}, {"a": np.ones(3), "b": [2 * np.ones(2)]}
  assert testing.rel_rms(tree, ref_tree) == pytest.approx(np.sqrt(2 / 11))  # all leaves together
  with pytest.raises(AssertionError, match="1 non-finite values in the result"):
    testing.rel_rms(np.array([1.0, np.nan]), np.ones(2))
  with pytest.raises(ValueError, match=r"equal shapes, got \(3,\) and reference \(4,\)"):
    testing.rel_rms(np.ones(3), np.ones(4))
  with pytest.raises(AssertionError, match="dq: 1 NaN where the reference has none"):
    testing.assert_nonfinite_like(np.array([np.nan, 1.0]), np.array([0.0, np.nan]), "dq")
  with pytest.raises(AssertionError, match="infinite values differ"):
    testing.assert_nonfinite_like(np.array([1.0, -np.inf]), np.array([np.inf, -np.inf]))
  want, same = (np.ones(4), np.ones(4)), (np.ones(4), np.ones(4))
  with pytest.raises(AssertionError, match=r"float32: out: rel RMS error 0.1 > bound 1e-05; rem"):
    testing.assert_gradients_within_tolerance((1.1 * np.ones(4), 0.9 * np.ones(4)), want, same,
                                              jnp.float32)
  errors = testing.assert_gradients_within_tolerance(want, want, same, jnp.bfloat16)
  assert errors == {"out": (0.0, 4e-3), "rem": (0.0, 4e-3)}


def test_stick_breaking_weights_are_the_ops_weights():
  """``A @ v`` is the op's output and each row of ``A`` sums to ``1 - rem`` (GQA, segments)."""
  q, k, v, seg = random_inputs(0, Shape(2, 24, 4, 2, 8), jnp.float32, segments=True)
  a = sbjax.stick_breaking_weights(q, k, scale=0.3, segment_ids=seg, attend_current=True)
  out, rem = sbjax.stick_breaking_attention(q, k, v, scale=0.3, segment_ids=seg,
                                            attend_current=True, implementation="xla",
                                            return_remainder=True)
  assert a.shape == (2, 4, 24, 24) and np.isfinite(np.asarray(a)).all()
  v_n = jnp.repeat(v, 2, axis=2)  # query head n reads kv head n // 2
  np.testing.assert_allclose(jnp.einsum("bnji,binh->bjnh", a, v_n), out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a.sum(-1).transpose(0, 2, 1), 1.0 - rem, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"query heads must be a multiple of key/value heads"):
    sbjax.stick_breaking_weights(q, k[:, :, :1].repeat(3, axis=2))
