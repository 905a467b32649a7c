"""The parameterised accuracy suite: every implementation against the float64 definition.

Each test takes the implementation as an argument; ``IMPLEMENTATIONS`` lists them (the Pallas
kernels run in interpret mode on the CPU, on small odd shapes).
"""

from __future__ import annotations

import functools

import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import attention_fn, stick_loop
from sbjax import reference
from sbjax.testing import (
    RESULT_NAMES, Shape, assert_gradients_within_tolerance, assert_within_tolerance,
    float64_gradients, float64_result, gradients, random_inputs, rel_rms,
    same_precision_gradients)

IMPLEMENTATIONS = ["xla", "scan", "pallas"]
PURE_JAX_IMPLEMENTATIONS = ["xla", "scan"]  # the kernels take fp32/bf16/fp16 and interpret slowly

DEFINITION_CASES = [  # (shape, segments, attend_current)
    (Shape(1, 1, 1, 1, 4), False, False),
    (Shape(1, 1, 2, 1, 4), False, True),
    (Shape(2, 2, 2, 2, 4), False, False),
    (Shape(1, 7, 4, 2, 8), False, True),
    (Shape(2, 13, 3, 1, 5, hv=3), True, False),
    (Shape(1, 33, 4, 4, 8), True, True),
]


@pytest.mark.parametrize("implementation", PURE_JAX_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape,segments,attend_current", DEFINITION_CASES,
                         ids=[f"{s}-seg{int(g)}-cur{int(c)}" for s, g, c in DEFINITION_CASES])
def test_matches_definition_float64(implementation, shape, segments, attend_current):
  q, k, v, seg = random_inputs(shape.t, shape, np.float64, segments=segments, logit_scale=2.0)
  want_out, want_rem = stick_loop(q, k, v, 0.7, None if seg is None else np.asarray(seg),
                                  attend_current)
  with jax.enable_x64(True):
    out, rem = attention_fn(implementation)(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.7, segment_ids=seg,
        attend_current=attend_current)
  assert out.dtype == jnp.float64 and rem.dtype == jnp.float64
  assert np.isfinite(out).all() and np.isfinite(rem).all()
  np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-10)
  np.testing.assert_allclose(rem, want_rem, rtol=0, atol=1e-10)


ACCURACY_CASES = [  # (shape, segments, attend_current): odd T, head dims 40 and 80, GQA, MQA
    (Shape(2, 100, 4, 2, 40), False, False),
    (Shape(1, 77, 3, 1, 80, hv=24), True, True),
]


def over_accuracy_cases(test):
  """Parameterises ``test`` over implementations, the three dtypes and ``ACCURACY_CASES``."""
  for mark in reversed((
      pytest.mark.parametrize("implementation", IMPLEMENTATIONS),
      pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16],
                              ids=lambda d: d.__name__),
      pytest.mark.parametrize("shape,segments,attend_current", ACCURACY_CASES,
                              ids=[f"{s}-seg{int(g)}-cur{int(c)}" for s, g, c in ACCURACY_CASES]))):
    test = mark(test)
  return test


@over_accuracy_cases
def test_low_precision_accuracy(implementation, dtype, shape, segments, attend_current):
  q, k, v, seg = random_inputs(1, shape, dtype, segments=segments, logit_scale=3.0)
  scale = shape.h**-0.5
  want_out, want_rem = float64_result(q, k, v, seg, scale, attend_current)
  same_out, same_rem = reference.stick_breaking_attention(
      q, k, v, scale, seg, attend_current=attend_current, dtype=dtype)
  out, rem = attention_fn(implementation)(q, k, v, segment_ids=seg, attend_current=attend_current)
  assert out.dtype == dtype and out.shape == want_out.shape
  assert rem.dtype == jnp.float32 and rem.shape == want_rem.shape
  assert_within_tolerance(rel_rms(out, want_out), rel_rms(same_out, want_out), dtype, "out")
  assert_within_tolerance(rel_rms(rem, want_rem), rel_rms(same_rem, want_rem), dtype, "rem")


@pytest.mark.parametrize("implementation", PURE_JAX_IMPLEMENTATIONS)
@pytest.mark.parametrize("segments,attend_current", [(False, False), (True, True)])
def test_check_grads_float64(implementation, segments, attend_current):
  shape = Shape(1, 9, 2, 1, 4)
  q, k, v, seg = random_inputs(3, shape, np.float64, segments=segments)
  f = attention_fn(implementation, segment_ids=seg, attend_current=attend_current)
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x) for x in (q, k, v)) + (jnp.float64(0.8),)
    # Both outputs, so the remainder's cotangent path is checked too.
    check_grads(lambda q, k, v, s: f(q, k, v, scale=s), args, order=1,
                              modes=("rev",), atol=1e-6, rtol=1e-6)


@over_accuracy_cases
def test_grads_against_float64(implementation, dtype, shape, segments, attend_current, cotangents):
  """Gradients of q, k, v and the scale, with random cotangents on both ``out`` and ``rem``."""
  q, k, v, seg = random_inputs(4, shape, dtype, segments=segments, logit_scale=2.0)
  d_out, d_rem = cotangents(q, v.shape[-1])
  fn = lambda q, k, v, s, g: attention_fn(implementation)(
      q, k, v, scale=s, segment_ids=seg, attend_current=attend_current, forget_gate=g)
  got = jax.jit(functools.partial(gradients, fn))(q, k, v, jnp.float32(0.3), d_out, d_rem)
  want = float64_gradients(q, k, v, seg, 0.3, attend_current, d_out, d_rem)
  same = same_precision_gradients(q, k, v, seg, 0.3, attend_current, d_out, d_rem)
  for name, g, w in zip(RESULT_NAMES, got, want):
    assert g.shape == w.shape, name
    assert g.dtype == {"out": dtype, "dq": dtype, "dk": dtype, "dv": dtype}.get(name, jnp.float32)
  assert_gradients_within_tolerance(got, want, same, dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_saturated_logits(implementation):
  """All logits very positive: out_j = v_{j-1}, rem = 0 (rem_0 = 1); very negative: out = 0, rem = 1."""
  b, t, h = 1, 12, 8
  rng = np.random.default_rng(6)
  u = np.ones(h, np.float32) / np.sqrt(h)
  k = jnp.asarray(np.broadcast_to(u, (b, t, 1, h)))
  v = jnp.asarray(rng.normal(size=(b, t, 1, h)).astype(np.float32))
  for sign in (1.0, -1.0):
    q = jnp.asarray(np.broadcast_to(sign * 1e4 * u, (b, t, 1, h)))
    out, rem = attention_fn(implementation)(q, k, v, scale=1.0)
    assert np.isfinite(out).all() and np.isfinite(rem).all()
    if sign > 0:
      np.testing.assert_allclose(out[:, 1:], v[:, :-1], atol=1e-6)
      np.testing.assert_array_equal(out[:, 0], 0.0)
      np.testing.assert_allclose(rem[:, 1:], 0.0, atol=1e-6)
      np.testing.assert_array_equal(rem[:, 0], 1.0)
    else:
      np.testing.assert_allclose(out, 0.0, atol=1e-6)
      np.testing.assert_allclose(rem, 1.0, atol=1e-6)


def constant_logit_closed_form(v, c):
  """Every logit ``c``: ``A_ji = s (1 - s)^(j - i - 1)`` with ``s = sigmoid(c)``, as recursions.

  ``o_j = s v_{j-1} + (1 - s) o_{j-1}`` and ``rem_j = (1 - s)^j``; v ``[T, H]`` -> ``([T, H], [T])``.
  """
  s = 1.0 / (1.0 + np.exp(-c))
  out = np.zeros_like(v, dtype=np.float64)
  for j in range(1, len(v)):
    out[j] = s * v[j - 1] + (1 - s) * out[j - 1]
  return out, (1 - s) ** np.arange(len(v))


# T=8192 for the pure-JAX paths only: interpreted kernels are too slow there (the GPU check runs
# the kernels at T up to 131072).
CLOSED_FORM_CASES = [(impl, t, c) for impl in IMPLEMENTATIONS for t, c in ((40, 0.5), (40, -2.0))]
CLOSED_FORM_CASES += [(impl, 8192, -3.0) for impl in PURE_JAX_IMPLEMENTATIONS]


@pytest.mark.parametrize("implementation,t,c", CLOSED_FORM_CASES)
def test_constant_logit_closed_form(implementation, t, c):
  """Long sequences stay finite and follow the closed form (a far key's weight underflows to 0)."""
  h = 8
  rng = np.random.default_rng(7)
  u = np.ones(h) / np.sqrt(h)
  q = jnp.asarray(np.broadcast_to(c * u, (1, t, 1, h)), jnp.float32)
  k = jnp.asarray(np.broadcast_to(u, (1, t, 1, h)), jnp.float32)
  v = rng.normal(size=(1, t, 1, h)).astype(np.float32)
  out, rem = attention_fn(implementation)(q, k, jnp.asarray(v), scale=1.0)
  want_out, want_rem = constant_logit_closed_form(v[0, :, 0].astype(np.float64), c)
  assert np.isfinite(out).all() and np.isfinite(rem).all()
  np.testing.assert_allclose(out[0, :, 0], want_out, atol=2e-5, rtol=0)
  np.testing.assert_allclose(rem[0, :, 0], want_rem, atol=2e-6, rtol=1e-4)
