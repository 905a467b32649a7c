"""Pallas Triton kernel extras: CUDA lowering on the CPU, determinism, exact skipping, in-place
reads (no padded copies), the swappable VJP, config. The accuracy suite shared with the other
implementations (gate and infinities included) is tests/test_op_accuracy.py."""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
import numpy as np
import pytest

import sbjax
from helpers import (SMALL_BLOCKS, Shape, assert_within_tolerance, far_inputs, float64_result,
                     random_inputs, rel_rms)
from sbjax import reference, testing
from sbjax.kernels import pallas_triton

_H200 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                     abstract_device=AbstractDevice("NVIDIA H200", None, "cuda"))
KERNEL_NAMES = ("stick_breaking_fwd", "stick_breaking_bwd_dq", "stick_breaking_bwd_dkv")


def lower_for_cuda(fn, *shapes) -> str:
  """StableHLO text of ``fn`` lowered for an H200, on any machine (no GPU needed)."""
  with jax.sharding.use_abstract_mesh(_H200):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape,segments,gated", [(Shape(2, 300, 6, 2, 64), True, False),
                                                  (Shape(1, 128, 3, 1, 80, hv=96), False, True)],
                         ids=str)
def test_forward_and_gradient_lower_to_triton(dtype, shape, segments, gated):
  sd = jax.ShapeDtypeStruct
  s = shape

  def loss(q, k, v, seg, scale, gate):
    out, rem = sbjax.stick_breaking_attention(
        q, k, v, scale=scale, segment_ids=seg, forget_gate=gate, implementation="pallas",
        return_remainder=True)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(rem)

  args = (sd((s.b, s.t, s.n, s.h), dtype), sd((s.b, s.t, s.k, s.h), dtype),
          sd((s.b, s.t, s.k, s.hv or s.h), dtype),
          sd((s.b, s.t), jnp.int32) if segments else None, sd((), jnp.float32),
          sd((s.b, s.t, s.k), jnp.float32) if gated else None)
  fwd = lower_for_cuda(loss, *args)
  grad = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 4, 5) if gated else (0, 1, 2, 4)), *args)
  triton_call = r"__gpu\$xla\.gpu\.triton"
  assert len(re.findall(triton_call, fwd)) == 1
  assert len(re.findall(triton_call, grad)) == 3
  for name in KERNEL_NAMES:
    assert re.search(rf'name = "{name}"', grad), name


def _grads(q, k, v, seg, block_sizes, d_out, d_rem, gate=None):
  """``testing.gradients`` of the interpreted kernels at scale 0.25."""
  fn = lambda q, k, v, s, g: sbjax.stick_breaking_attention(
      q, k, v, scale=s, segment_ids=seg, forget_gate=g, implementation="pallas", interpret=True,
      block_sizes=block_sizes, return_remainder=True)
  return testing.gradients(fn, q, k, v, jnp.float32(0.25), d_out, d_rem, gate)


def _assert_close_to_float64(got, q, k, v, d_out, d_rem, gate=None):
  """``got = _grads(...)`` against float64 under the tolerance rule."""
  want = testing.float64_gradients(q, k, v, None, 0.25, False, d_out, d_rem, gate)
  same = testing.same_precision_gradients(q, k, v, None, 0.25, False, d_out, d_rem, gate)
  testing.assert_gradients_within_tolerance(got, want, same, q.dtype)


def test_backward_is_bitwise_deterministic():
  """Interpret mode on a CPU is deterministic anyway; this pins the CPU suite's side of the
  contract, and experiments/check_gpu.py compares 20 compiled runs on the GPU."""
  q, k, v, seg = random_inputs(0, Shape(1, 96, 4, 2, 16), jnp.bfloat16, segments=True)
  rng = np.random.default_rng(1)
  d_out, d_rem = jnp.asarray(rng.normal(size=q.shape)), jnp.asarray(rng.normal(size=q.shape[:3]))
  fn = jax.jit(functools.partial(_grads, block_sizes=SMALL_BLOCKS))
  first, second = fn(q, k, v, seg, d_out=d_out, d_rem=d_rem), fn(q, k, v, seg, d_out=d_out,
                                                                   d_rem=d_rem)
  chex.assert_trees_all_equal(first, second)


@pytest.mark.parametrize("dtype,logit_scale,gated", [(jnp.float32, 4.0, False),
                                                     (jnp.bfloat16, 300.0, False),
                                                     (jnp.float32, 4.0, True)],
                         ids=["fp32-strong", "bf16-saturated", "fp32-gated-infinite"])
def test_skipping_a_used_stick_is_exact(dtype, logit_scale, gated):
  """Positive logits use the stick up within a few keys: skipping the rest changes no bit, and
  both stay within the tolerance rule against float64 (|z| reaches ~1e3 in the saturated case).
  Gated: a gate only slows the stick down, so skipping stays exact (gates at +-inf and +-30).

  Why the argument holds: once a row's log2-stick is below -152, every farther weight
  ``exp2(log2 beta + stick)`` is below 2^-152 and rounds to 0 in fp32, so are ``G = A (...)`` and
  its prefixes, hence ``dz`` and every skipped contribution. The GPU check
  (experiments/check_gpu.py) compares the compiled skipping and dense kernels bitwise.
  """
  shape = Shape(1, 70, 2, 1, 16) if gated else Shape(1, 150, 2, 1, 16)
  q, k, v, _ = random_inputs(0, shape, jnp.float32, logit_scale=logit_scale)
  q, k, v = (q + 3.0).astype(dtype), (k + 1.0).astype(dtype), v.astype(dtype)
  gate = None
  if gated:
    g = np.random.default_rng(2).normal(size=(shape.b, shape.t, shape.k)) * 3.0
    g.reshape(-1)[::9], g.reshape(-1)[4::11], g.reshape(-1)[5::13] = np.inf, -np.inf, 30.0
    gate = jnp.asarray(g, jnp.float32)
  rng = np.random.default_rng(1)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  run = jax.jit(functools.partial(_grads, d_out=d_out, d_rem=d_rem), static_argnums=4)
  skipped = run(q, k, v, None, SMALL_BLOCKS, gate=gate)
  full = run(q, k, v, None, dataclasses.replace(SMALL_BLOCKS, skip_used_stick=False), gate=gate)
  assert float(jnp.min(skipped[1])) == 0.0  # the stick really is used up
  chex.assert_trees_all_equal(skipped, full)
  if not gated:  # the gated oracle (infinite gates) is tests/test_op_accuracy.py's
    _assert_close_to_float64(skipped, q, k, v, d_out, d_rem)


@pytest.mark.parametrize("tolerance", [1e-3, 1e-2])
def test_skip_tolerance_bounds_the_error(tolerance):
  """``skip_tolerance`` stops long sticks early (exact skipping does not) and stays within the
  documented bounds (``testing.skip_tolerance_bounds``) against float64: output, remainder (an
  upper bound of the exact one) and every gradient, element by element."""
  shape = Shape(1, 320, 2, 1, 16)
  q, k, v = far_inputs(0, shape, shift=-3.5)  # stick ~ exp(-0.03 per key): 1e-2 after 150 keys
  rng = np.random.default_rng(1)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  fn = lambda q, k, v, s: sbjax.stick_breaking_attention(
      q, k, v, scale=s, implementation="pallas", interpret=True, skip_tolerance=tolerance,
      block_sizes=dataclasses.replace(SMALL_BLOCKS, num_blocks_per_check=2,
                                      num_blocks_per_check_bwd=2), return_remainder=True)
  got = jax.jit(lambda q, k, v: testing.gradients(
      lambda q, k, v, s, g: fn(q, k, v, s), q, k, v, jnp.float32(0.25), d_out, d_rem))(q, k, v)
  want = testing.float64_gradients(q, k, v, None, 0.25, False, d_out, d_rem)
  bounds = testing.skip_tolerance_bounds(q, k, v, 0.25, d_out, d_rem, tolerance)
  for name, g, w, bound in zip(testing.RESULT_NAMES, got, want, bounds):
    g = np.asarray(g, np.float64)
    assert np.isfinite(g).all(), name
    # fp32 rounding (relative 1e-5 of the largest value) comes on top of the skipping bound.
    excess = np.abs(g - w) - bound - 1e-5 * np.abs(w).max()
    assert excess.max() <= 0, f"{name}: error above the bound by {excess.max():.3g}"
  rem, rem64 = np.asarray(got[1], np.float64), want[1]
  assert (rem >= rem64 - 1e-6).all()  # an upper bound
  stopped = rem > 2.0 * rem64  # rows whose walk stopped early (a full walk: equal to ~1e-6)
  assert stopped.mean() >= 0.1, stopped.mean()
  assert rem64[:, -1].max() > 2.0 ** -152  # exact skipping could not have stopped at all


def test_skipping_checks_between_pipelined_chunks():
  """The stop test runs every 3 (forward) and 5 (backward) key blocks, so the walk also ends in a
  partial chunk: results equal the dense walk bit for bit, forward and gradients."""
  shape = Shape(1, 150, 2, 1, 16)
  q, k, v, _ = random_inputs(0, shape, jnp.float32, logit_scale=4.0)
  q, k = q + 3.0, k + 1.0
  rng = np.random.default_rng(1)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  run = jax.jit(functools.partial(_grads, d_out=d_out, d_rem=d_rem), static_argnums=4)
  full = run(q, k, v, None, dataclasses.replace(SMALL_BLOCKS, skip_used_stick=False))
  chunked = run(q, k, v, None, dataclasses.replace(SMALL_BLOCKS, num_blocks_per_check=3,
                                                   num_blocks_per_check_bwd=5))
  assert float(jnp.min(chunked[1])) == 0.0
  chex.assert_trees_all_equal(chunked, full)


def test_head_dim_256():
  """The largest head dim, with the default blocks for it, forward and gradients (bf16)."""
  shape = Shape(1, 40, 2, 1, 256)
  q, k, v, _ = random_inputs(2, shape, jnp.bfloat16)
  rng = np.random.default_rng(3)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  got = jax.jit(functools.partial(_grads, block_sizes=None, d_out=d_out, d_rem=d_rem))(q, k, v, None)
  _assert_close_to_float64(got, q, k, v, d_out, d_rem)


def test_block_sizes_validation():
  with pytest.raises(ValueError, match=r"BlockSizes.block_q must be a power of two >= 16, got 48"):
    sbjax.BlockSizes(block_q=48)
  with pytest.raises(ValueError, match=r"BlockSizes.num_warps must be a power of two, got 3"):
    sbjax.BlockSizes(num_warps=3)
  with pytest.raises(ValueError, match=r"BlockSizes.skip_used_stick must be a bool"):
    sbjax.BlockSizes(skip_used_stick=1)
  with pytest.raises(ValueError, match=r"BlockSizes.num_blocks_per_check must be a positive int, "
                                       r"got 0"):
    sbjax.BlockSizes(num_blocks_per_check=0)
  q, _, _, _ = random_inputs(0, Shape(1, 8, 2, 1, 16), jnp.float32)
  for bad in (-0.1, 1.0, True, "1e-3"):
    with pytest.raises(ValueError, match=rf"skip_tolerance must be a float in \[0, 1\), got "
                                         rf"{re.escape(repr(bad))}"):
      sbjax.stick_breaking_attention(q, q[:, :, :1], q[:, :, :1], skip_tolerance=bad)
  assert sbjax.BlockSizes.get_default(128, jnp.bfloat16) == sbjax.BlockSizes()


def test_pallas_rejects_float64_and_auto_mode_falls_back():
  q, _, _, _ = random_inputs(0, Shape(1, 8, 2, 1, 16), jnp.float32)
  with jax.enable_x64(True):
    q64 = jnp.asarray(np.asarray(q, np.float64))
    with pytest.raises(ValueError, match=r"supports float32, bfloat16 and float16 inputs, got "
                                         r"query.dtype=float64; use implementation='scan'"):
      sbjax.stick_breaking_attention(q64, q64[:, :, :1], q64[:, :, :1], implementation="pallas")
    assert sbjax.ops.default_implementation(q64, q64) == "scan"


def test_runs_with_x64_enabled():
  """``jax_enable_x64`` must not change the kernels' int32 index arithmetic (fp32 inputs)."""
  q, k, v, seg = random_inputs(5, Shape(1, 70, 2, 1, 16), jnp.float32, segments=True)
  rng = np.random.default_rng(6)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  want = _grads(q, k, v, seg, SMALL_BLOCKS, d_out, d_rem)
  with jax.enable_x64(True):
    got = _grads(q, k, v, seg, SMALL_BLOCKS, d_out, d_rem)
  chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("c", [-17.0, -12.0])
def test_fp32_accuracy_for_small_betas(c):
  """Negative logits take tiny shares per key; in fp32 their rounding would sum along the row."""
  t, h = 512, 8
  u = np.ones(h, np.float32) / np.sqrt(h)
  rng = np.random.default_rng(7)
  q = jnp.asarray(np.broadcast_to(c * u, (1, t, 1, h)), jnp.float32)
  k = jnp.asarray(np.broadcast_to(u, (1, t, 1, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, t, 1, h)), jnp.float32)
  want_out, want_rem = float64_result(q, k, v, None, 1.0, False)
  same_out, same_rem = sbjax.reference.stick_breaking_attention(q, k, v, 1.0)
  out, rem = sbjax.stick_breaking_attention(q, k, v, scale=1.0, implementation="pallas",
                                            interpret=True, return_remainder=True)
  assert_within_tolerance(rel_rms(out, want_out), rel_rms(same_out, want_out), jnp.float32, "out")
  assert_within_tolerance(rel_rms(rem, want_rem), rel_rms(same_rem, want_rem), jnp.float32, "rem")


def _primitives(jaxpr, skip=("pallas_call",)) -> set[str]:
  """Names of the primitives of ``jaxpr`` and its sub-jaxprs, not looking inside ``skip``."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name in skip:
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          names |= _primitives(sub.jaxpr, skip)
        elif isinstance(sub, jex_core.Jaxpr):
          names |= _primitives(sub, skip)
  return names


def test_inputs_are_read_in_place():
  """A partial last block (T=37) and head dims that are not powers of two (20, 12) are masked in
  the kernels, as JAX's attention.py masks its head dim: neither pass pads or copies q, k, v, so
  the custom VJP's residuals are the caller's arrays."""
  shape = Shape(1, 37, 2, 1, 20, hv=12)
  q, k, v, seg = random_inputs(0, shape, jnp.bfloat16, segments=True)
  gate = jnp.zeros((shape.b, shape.t, shape.k), jnp.float32)

  def loss(q, k, v, gate):
    out, rem = sbjax.stick_breaking_attention(
        q, k, v, segment_ids=seg, forget_gate=gate, implementation="pallas", interpret=True,
        block_sizes=SMALL_BLOCKS, return_remainder=True)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(rem)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gate).jaxpr
  prims = _primitives(jaxpr)
  assert "pallas_call" in prims
  assert not prims & {"pad", "concatenate", "dynamic_update_slice"}, prims


def test_backward_kernels_match_autodiff_of_the_reference():
  """tokamax style: one forward kernel, differentiated by the backward kernels and, through the
  ``reference_vjp`` switch, by autodiff of the dense reference; both within the tolerance rule of
  float64 (fp32, segments, gate, partial blocks, attend_current)."""
  shape = Shape(1, 37, 2, 1, 24)
  q, k, v, seg = random_inputs(3, shape, jnp.float32, segments=True, logit_scale=2.0)
  gate = jnp.asarray(np.random.default_rng(4).normal(size=(shape.b, shape.t, shape.k)) * 3.0,
                     jnp.float32)
  rng = np.random.default_rng(5)
  d_out, d_rem = rng.normal(size=q.shape), rng.normal(size=q.shape[:3])

  def kernels(vjp):
    return lambda q, k, v, s, g: pallas_triton.stick_breaking_attention(
        q, k, v, s, seg, g, attend_current=True, block_sizes=SMALL_BLOCKS, interpret=True,
        reference_vjp=vjp)

  want = testing.float64_gradients(q, k, v, seg, 0.25, True, d_out, d_rem, gate)
  same = testing.same_precision_gradients(q, k, v, seg, 0.25, True, d_out, d_rem, gate)
  results = {}
  for name, vjp in (("kernels", None), ("reference", reference.stick_breaking_attention)):
    results[name] = jax.jit(functools.partial(testing.gradients, kernels(vjp)))(
        q, k, v, jnp.float32(0.25), d_out, d_rem, gate)
    testing.assert_gradients_within_tolerance(results[name], want, same, jnp.float32)
  chex.assert_trees_all_equal(results["kernels"][:2], results["reference"][:2])  # one forward
