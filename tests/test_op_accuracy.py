"""The shared accuracy suite: one test base, injected with each implementation (tokamax style).

``OpSuite`` holds every test that all implementations must pass against the float64 definition;
``TestXla``, ``TestScan`` and ``TestPallasInterpret`` inject the implementation. The pure-JAX
paths also take float64 inputs (``PureJaxSuite``), the scan path long sequences; the Pallas kernels
run in interpret mode on small odd shapes (their other extras are in test_pallas_triton.py).
"""

from __future__ import annotations

import functools

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import attention_fn, stick_loop
from sbjax import reference, scan
from sbjax.testing import (
    RESULT_NAMES, Shape, assert_gradients_within_tolerance, float64_gradients, float64_result,
    gradients, random_inputs, same_precision_gradients, tolerance_errors)

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def random_gate(seed: int, shape: Shape, dtype=np.float32, *, std=3.0):
  """Forget-gate logits ``[B, T, K]``: normal with ``std``, so that some gates saturate."""
  g = np.random.default_rng(seed).normal(size=(shape.b, shape.t, shape.k)) * std
  return np.asarray(g, dtype) if dtype == np.float64 else jnp.asarray(g, dtype)


def with_infinite_gates(g):
  """``g`` with a few entries at +-inf and +-1e4 (saturated both ways)."""
  g = np.array(g)
  flat = g.reshape(-1)
  flat[1::7], flat[3::11], flat[4::13], flat[5::17] = np.inf, -np.inf, 1e4, -1e4
  return g


# (dtype, shape, segments, attend_current, gated); odd T, head dims 40 and 80, GQA, MQA. The
# gated case skips float16: only float32 takes other code than bfloat16 in the kernels, and
# compiles are most of a test's time.
_PLAIN = (Shape(2, 100, 4, 2, 40), False, False, False)
_GATED = (Shape(1, 77, 3, 1, 80, hv=24), True, True, True)
ACCURACY_CASES = [(d,) + _PLAIN for d in DTYPES] + [(d,) + _GATED for d in DTYPES[:2]]
accuracy_cases = pytest.mark.parametrize(
    "dtype,shape,segments,attend_current,gated", ACCURACY_CASES,
    ids=[f"{jnp.dtype(d).name}-{s}-seg{int(g)}-cur{int(c)}-gate{int(f)}"
         for d, s, g, c, f in ACCURACY_CASES])

# The float64 and same-precision results of a case are the same for every implementation:
# computed once per test process (compiling them is most of a test's time).


@functools.cache
def gradient_case(dtype, shape, segments, attend_current, gated):
  """``((q, k, v, seg, g, d_out, d_rem), want, same)`` for ``test_gradient_accuracy`` (scale 0.3)."""
  q, k, v, seg = random_inputs(4, shape, dtype, segments=segments, logit_scale=2.0)
  g = random_gate(4, shape) if gated else None
  rng = np.random.default_rng(5)
  d_out, d_rem = rng.normal(size=q.shape[:3] + v.shape[-1:]), rng.normal(size=q.shape[:3])
  want = float64_gradients(q, k, v, seg, 0.3, attend_current, d_out, d_rem, g)
  same = same_precision_gradients(q, k, v, seg, 0.3, attend_current, d_out, d_rem, g)
  return (q, k, v, seg, g, d_out, d_rem), want, same


@functools.cache
def infinity_case(where: str, dtype=jnp.float32, head_dim: int = 16):
  """``((q, k, v, g, d_out, d_rem), want, same)`` for ``test_infinities`` (scale 0.25).

  ``where="inputs"``: batch 0 has a key element at -inf, batch 1 one at +inf and, at another
  position, a query element at +inf (all in head dim 3, so no dot product meets inf - inf).
  ``where="forget_gate"``: finite inputs, gates at +-inf and +-1e4 among normal ones.
  """
  shape = Shape(2, 40, 4, 2, head_dim)
  q, k, v, _ = random_inputs(8, shape, dtype)
  g = None
  if where == "forget_gate":
    g = jnp.asarray(with_infinite_gates(random_gate(8, shape)))
  else:
    q, k = np.array(q, np.float32), np.array(k, np.float32)
    k[0, 20, 1, 3], k[1, 12, 0, 3], q[1, 30, 2, 3] = -np.inf, np.inf, np.inf
    q, k = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  rng = np.random.default_rng(5)
  d_out, d_rem = rng.normal(size=q.shape), rng.normal(size=q.shape[:3])
  want = float64_gradients(q, k, v, None, 0.25, False, d_out, d_rem, g)
  same = same_precision_gradients(q, k, v, None, 0.25, False, d_out, d_rem, g)
  return (q, k, v, g, d_out, d_rem), want, same


class OpSuite:
  """Tests every implementation must pass; subclasses set ``IMPLEMENTATION`` (and, for kernels
  that take only some inputs, the dtype and smallest head dim of the fixed-input tests)."""

  IMPLEMENTATION: str
  DTYPE = jnp.float32  # inputs of the fixed-input tests below
  MIN_HEAD_DIM = 1

  def head_dim(self, h: int) -> int:
    return max(h, self.MIN_HEAD_DIM)

  def attention(self, **fixed):
    """``f(q, k, v, **kw) -> (out, rem)`` of this implementation, jitted (one compile instead of
    one per primitive; ``attend_current`` static)."""
    return jax.jit(attention_fn(self.IMPLEMENTATION, **fixed), static_argnames=("attend_current",))

  def gradients(self, q, k, v, scale, d_out, d_rem, forget_gate=None, **fixed):
    """``(out, rem, dq, dk, dv, dscale[, dforget_gate])`` of this implementation, jitted."""
    attn = self.attention(**fixed)
    fn = lambda q, k, v, s, g: attn(q, k, v, scale=s, forget_gate=g)
    return jax.jit(functools.partial(gradients, fn))(
        q, k, v, jnp.float32(scale), d_out, d_rem, forget_gate)

  @accuracy_cases
  def test_gradient_accuracy(self, dtype, shape, segments, attend_current, gated):
    """``out``, ``rem`` and the gradients of q, k, v, the scale (and the gate), with random
    cotangents on ``out`` and ``rem``, against float64 under the tolerance rule."""
    (q, k, v, seg, g, d_out, d_rem), want, same = gradient_case(
        dtype, shape, segments, attend_current, gated)
    got = self.gradients(q, k, v, 0.3, d_out, d_rem, g, segment_ids=seg,
                         attend_current=attend_current)
    input_dtype = dict(out=dtype, dq=dtype, dk=dtype, dv=dtype)
    for name, x in zip(RESULT_NAMES, got):
      assert x.dtype == input_dtype.get(name, jnp.float32), name
    assert_gradients_within_tolerance(got, want, same, dtype)

  @pytest.mark.parametrize("where", ["inputs", "forget_gate"])
  def test_infinities(self, where):
    """sigmoid(+inf) = 1 and sigmoid(-inf) = 0 keep the stick well defined: outputs stay finite
    and agree with float64; gradients are NaN only where float64's are (an infinite input times
    a zero cotangent is NaN in any precision) and equal its infinities."""
    (q, k, v, g, d_out, d_rem), want, same = infinity_case(where, self.DTYPE, self.head_dim(16))
    got = self.gradients(q, k, v, 0.25, d_out, d_rem, g)
    assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
    assert_gradients_within_tolerance(got, want, same, self.DTYPE, nonfinite_like_reference=True)
    if g is not None:  # an open gate (g = +inf, f = 1) gets no gradient at all
      np.testing.assert_array_equal(np.asarray(got[-1])[np.asarray(g) == np.inf], 0.0)

  def test_open_gate_is_the_ungated_op(self):
    """``g = +inf`` gives ``f = 1``: the ungated op, bit for bit."""
    shape = Shape(1, 40, 4, 2, self.head_dim(16))
    q, k, v, seg = random_inputs(9, shape, self.DTYPE, segments=True)
    open_gate = jnp.full((shape.b, shape.t, shape.k), jnp.inf)
    ungated = self.attention()(q, k, v, segment_ids=seg)
    gated = self.attention()(q, k, v, segment_ids=seg, forget_gate=open_gate)
    for name, a, b in zip(("out", "rem"), ungated, gated):
      np.testing.assert_array_equal(a, b, err_msg=name)

  def test_saturated_logits(self):
    """All logits very positive: out_j = v_{j-1}, rem = 0 (rem_0 = 1); very negative: out = 0,
    rem = 1."""
    b, t, h = 1, 12, self.head_dim(8)
    rng = np.random.default_rng(6)
    u = np.ones(h, np.float32) / np.sqrt(h)
    k = jnp.asarray(np.broadcast_to(u, (b, t, 1, h)), self.DTYPE)
    v = jnp.asarray(rng.normal(size=(b, t, 1, h)), self.DTYPE)
    for sign in (1.0, -1.0):
      q = jnp.asarray(np.broadcast_to(sign * 1e4 * u, (b, t, 1, h)), self.DTYPE)
      out, rem = self.attention()(q, k, v, scale=1.0)
      assert np.isfinite(out).all() and np.isfinite(rem).all()
      if sign > 0:
        np.testing.assert_allclose(out[:, 1:], v[:, :-1], atol=1e-6)
        np.testing.assert_array_equal(out[:, 0], 0.0)
        np.testing.assert_allclose(rem[:, 1:], 0.0, atol=1e-6)
        np.testing.assert_array_equal(rem[:, 0], 1.0)
      else:
        np.testing.assert_allclose(out, 0.0, atol=1e-6)
        np.testing.assert_allclose(rem, 1.0, atol=1e-6)

  @pytest.mark.parametrize("c", [0.5, -2.0])
  def test_constant_logit_closed_form(self, c):
    self.check_constant_logit_closed_form(40, c)

  def check_constant_logit_closed_form(self, t, c):
    """Long sequences stay finite and follow the closed form (a far key's weight underflows to 0)."""
    h = self.head_dim(8)
    rng = np.random.default_rng(7)
    u = np.ones(h) / np.sqrt(h)
    q = jnp.asarray(np.broadcast_to(c * u, (1, t, 1, h)), self.DTYPE)
    k = jnp.asarray(np.broadcast_to(u, (1, t, 1, h)), self.DTYPE)
    v = jnp.asarray(rng.normal(size=(1, t, 1, h)), self.DTYPE)
    out, rem = self.attention()(q, k, v, scale=1.0)
    qk = np.asarray(q[0, 0, 0], np.float64) @ np.asarray(k[0, 0, 0], np.float64)
    want_out, want_rem = constant_logit_closed_form(np.asarray(v, np.float64)[0, :, 0], qk)
    assert np.isfinite(out).all() and np.isfinite(rem).all()
    # float32: the kernels' own error; bf16/fp16: out is rounded to the input dtype (4 ulps of
    # max|v|, the weights' rounding in the a @ v product included).
    out_atol = 2e-5 if self.DTYPE == jnp.float32 else 4 * float(jnp.finfo(self.DTYPE).eps) * float(
        np.abs(np.asarray(v, np.float32)).max())
    np.testing.assert_allclose(np.asarray(out[0, :, 0], np.float64), want_out, atol=out_atol, rtol=0)
    np.testing.assert_allclose(rem[0, :, 0], want_rem, atol=2e-6, rtol=1e-4)


def constant_logit_closed_form(v, c):
  """Every logit ``c``: ``A_ji = s (1 - s)^(j - i - 1)`` with ``s = sigmoid(c)``, as recursions.

  ``o_j = s v_{j-1} + (1 - s) o_{j-1}`` and ``rem_j = (1 - s)^j``; v ``[T, H]`` -> ``([T, H], [T])``.
  """
  s = 1.0 / (1.0 + np.exp(-c))
  out = np.zeros_like(v, dtype=np.float64)
  for j in range(1, len(v)):
    out[j] = s * v[j - 1] + (1 - s) * out[j - 1]
  return out, (1 - s) ** np.arange(len(v))


DEFINITION_CASES = [  # (shape, segments, attend_current, gated)
    (Shape(1, 1, 1, 1, 4), False, False, False),
    (Shape(1, 1, 2, 1, 4), False, True, True),
    (Shape(2, 2, 2, 2, 4), False, False, False),
    (Shape(1, 7, 4, 2, 8), False, True, True),
    (Shape(2, 13, 3, 1, 5, hv=3), True, False, True),
    (Shape(1, 33, 4, 4, 8), True, True, False),
]


class PureJaxSuite(OpSuite):
  """The pure-JAX paths also take float64 inputs."""

  @pytest.mark.parametrize(
      "shape,segments,attend_current,gated", DEFINITION_CASES,
      ids=[f"{s}-seg{int(g)}-cur{int(c)}-gate{int(f)}" for s, g, c, f in DEFINITION_CASES])
  def test_matches_definition_float64(self, shape, segments, attend_current, gated, x64):
    """Against the definition loop, with infinite and saturated gates where gated."""
    q, k, v, seg = random_inputs(shape.t, shape, np.float64, segments=segments, logit_scale=2.0)
    g = with_infinite_gates(random_gate(shape.t, shape, np.float64)) if gated else None
    seg_np = None if seg is None else np.asarray(seg)
    want_out, want_rem = stick_loop(q, k, v, 0.7, seg_np, attend_current, g)
    out, rem = self.attention()(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.7, segment_ids=seg,
        attend_current=attend_current, forget_gate=None if g is None else jnp.asarray(g))
    assert out.dtype == jnp.float64 and rem.dtype == jnp.float64
    assert np.isfinite(out).all() and np.isfinite(rem).all()
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-10)
    np.testing.assert_allclose(rem, want_rem, rtol=0, atol=1e-10)

  @pytest.mark.parametrize("segments,attend_current,gated",
                           [(False, False, False), (True, True, True)])
  def test_check_grads_float64(self, segments, attend_current, gated, x64):
    """Autodiff against finite differences, both outputs, the scale and the gate."""
    shape = Shape(1, 9, 2, 1, 4)
    q, k, v, seg = random_inputs(3, shape, np.float64, segments=segments)
    f = self.attention(segment_ids=seg, attend_current=attend_current)
    args = tuple(jnp.asarray(x) for x in (q, k, v)) + (jnp.float64(0.8),)
    if gated:
      args += (jnp.asarray(random_gate(3, shape, np.float64, std=1.0)),)
    # Jitted: finite differences call it several times on the same shapes.
    fn = jax.jit(lambda q, k, v, s, g=None: f(q, k, v, scale=s, forget_gate=g))
    check_grads(fn, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


class TestXla(PureJaxSuite):
  IMPLEMENTATION = "xla"


class TestScan(PureJaxSuite):
  """The path for long sequences (the dense one holds O(T^2) and the kernels' long cases run in
  experiments/check_gpu.py)."""

  IMPLEMENTATION = "scan"

  def test_long_constant_logit_closed_form(self):
    """T=4096: weights underflow to 0 after ~1800 keys (one query block at this size)."""
    self.check_constant_logit_closed_form(4096, -3.0)

  def test_query_blocks_and_padding(self):
    """Several query blocks, the last one padded (T=77 in blocks of 16), with segments and the
    gate: forward and gradients against float64, as long sequences run by default."""
    shape = Shape(1, 77, 4, 2, 16)
    q, k, v, seg = random_inputs(10, shape, jnp.float32, segments=True)
    g = random_gate(10, shape)
    rng = np.random.default_rng(11)
    d_out, d_rem = rng.normal(size=q.shape), rng.normal(size=q.shape[:3])
    fn = lambda q, k, v, s, g: scan.stick_breaking_attention(
        q, k, v, s, seg, g, attend_current=True, block_q=16)
    got = jax.jit(functools.partial(gradients, fn))(q, k, v, jnp.float32(0.25), d_out, d_rem, g)
    want = float64_gradients(q, k, v, seg, 0.25, True, d_out, d_rem, g)
    same = same_precision_gradients(q, k, v, seg, 0.25, True, d_out, d_rem, g)
    assert_gradients_within_tolerance(got, want, same, jnp.float32)


  def test_eager_calls_compile_once(self):
    """Outside jit the op still compiles the scan path once per shape, not on every call."""
    q, k, v, _ = random_inputs(12, Shape(1, 24, 2, 1, 8), jnp.float32)
    before = scan.stick_breaking_attention._cache_size()  # pylint: disable=protected-access
    for _ in range(3):
      attention_fn("scan")(q, k, v)
    assert scan.stick_breaking_attention._cache_size() == before + 1  # pylint: disable=protected-access

  def test_bf16_gradients_as_accurate_as_the_dense_path(self):
    """The weights are rounded to bf16 for the value matmul (as in the kernels), but their
    cotangent must not be: autodiff of that rounding made bf16 ``dscale`` 600x less accurate than
    the dense path's (7.6e-4 against 1.3e-6 here), still inside the tolerance cap."""
    shape = Shape(1, 80, 4, 2, 32)
    q, k, v, _ = random_inputs(0, shape, jnp.bfloat16)
    rng = np.random.default_rng(1)
    d_out, d_rem = rng.normal(size=q.shape), rng.normal(size=q.shape[:3])
    scale = shape.h**-0.5
    want = float64_gradients(q, k, v, None, scale, False, d_out, d_rem)
    errors = {}
    for impl in ("xla", "scan"):
      fn = lambda q, k, v, s, g, impl=impl: attention_fn(impl)(q, k, v, scale=s, forget_gate=g)
      got = jax.jit(functools.partial(gradients, fn))(q, k, v, jnp.float32(scale), d_out, d_rem)
      errors[impl] = tolerance_errors(got, want, None, jnp.bfloat16)
    for name in ("dq", "dk", "dscale"):
      assert errors["scan"][name][0] <= 2 * errors["xla"][name][0] + 1e-5, (name, errors)


class TestPallasInterpret(OpSuite):
  """The kernels in interpret mode with small blocks (helpers.SMALL_BLOCKS), so that the shapes
  above cross several query and key blocks; T=8192 is left to experiments/check_gpu.py."""

  IMPLEMENTATION = "pallas"


# Mosaic GPU takes bf16/fp16 with head dims 64 and 128: odd T, GQA with several query and key
# blocks; segments, gate and attend_current; MQA at head dim 128.
MOSAIC_CASES = [(jnp.bfloat16, Shape(2, 100, 4, 2, 64), False, False, False),
                (jnp.float16, Shape(1, 77, 3, 1, 64), True, True, True),
                (jnp.bfloat16, Shape(1, 130, 2, 1, 128), True, False, True)]


class TestPallasMosaicInterpret(OpSuite):
  """The Mosaic GPU kernels (forward and backward) in Mosaic GPU interpret mode (the
  one-warpgroup forward; compiled on a GPU, the op's default tiling), on the inputs they take
  (bf16 for the fixed-input tests, head dim 64 at least); their other structures are in
  test_pallas_mosaic_gpu.py."""

  IMPLEMENTATION = "pallas_mosaic_gpu"
  DTYPE = jnp.bfloat16
  MIN_HEAD_DIM = 64

  @pytest.mark.parametrize(
      "dtype,shape,segments,attend_current,gated", MOSAIC_CASES,
      ids=[f"{jnp.dtype(d).name}-{s}-seg{int(g)}-cur{int(c)}-gate{int(f)}"
           for d, s, g, c, f in MOSAIC_CASES])
  def test_gradient_accuracy(self, dtype, shape, segments, attend_current, gated):
    super().test_gradient_accuracy(dtype, shape, segments, attend_current, gated)
