"""Pallas Triton kernel extras: CUDA lowering on the CPU, determinism, exact skipping, config."""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
import numpy as np
import pytest

import sbjax
from helpers import (
    SMALL_BLOCKS, Shape, assert_within_tolerance, float64_result, random_inputs, rel_rms)

_H200 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                     abstract_device=AbstractDevice("NVIDIA H200", None, "cuda"))
KERNEL_NAMES = ("stick_breaking_fwd", "stick_breaking_bwd_dq", "stick_breaking_bwd_dkv")


def lower_for_cuda(fn, *shapes) -> str:
  """StableHLO text of ``fn`` lowered for an H200, on any machine (no GPU needed)."""
  with jax.sharding.use_abstract_mesh(_H200):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape,segments", [(Shape(2, 300, 6, 2, 64), True),
                                            (Shape(1, 128, 3, 1, 80, hv=96), False)], ids=str)
def test_forward_and_gradient_lower_to_triton(dtype, shape, segments):
  sd = jax.ShapeDtypeStruct
  s = shape

  def loss(q, k, v, seg, scale):
    out, rem = sbjax.stick_breaking_attention(
        q, k, v, scale=scale, segment_ids=seg, implementation="pallas", return_remainder=True)
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(rem)

  args = (sd((s.b, s.t, s.n, s.h), dtype), sd((s.b, s.t, s.k, s.h), dtype),
          sd((s.b, s.t, s.k, s.hv or s.h), dtype),
          sd((s.b, s.t), jnp.int32) if segments else None, sd((), jnp.float32))
  fwd = lower_for_cuda(loss, *args)
  grad = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 4)), *args)
  triton_call = r"__gpu\$xla\.gpu\.triton"
  assert len(re.findall(triton_call, fwd)) == 1
  assert len(re.findall(triton_call, grad)) == 3
  for name in KERNEL_NAMES:
    assert re.search(rf'name = "{name}"', grad), name


def _grads(q, k, v, seg, block_sizes, d_out, d_rem):
  def f(q, k, v, scale):
    return sbjax.stick_breaking_attention(
        q, k, v, scale=scale, segment_ids=seg, implementation="pallas", interpret=True,
        block_sizes=block_sizes, return_remainder=True)
  (out, rem), vjp = jax.vjp(f, q, k, v, jnp.float32(0.25))
  return (out, rem) + vjp((d_out.astype(out.dtype), d_rem))


def _assert_close_to_float64(got, q, k, v, d_out, d_rem):
  """``got = _grads(...)`` (scale 0.25) against float64 under the tolerance rule; ``rem`` is
  compared absolutely, since it is exactly 0 in many rows once sticks are used up."""
  dtype = q.dtype

  def reference_grads(q, k, v, scale, math_dtype=None):
    f = lambda q, k, v, s: sbjax.reference.stick_breaking_attention(q, k, v, s, dtype=math_dtype)
    (out, rem), vjp = jax.vjp(f, q, k, v, scale)
    return (out, rem) + vjp((d_out.astype(out.dtype), d_rem.astype(rem.dtype)))

  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    want = [np.asarray(x) for x in reference_grads(up(q), up(k), up(v), jnp.float64(0.25))]
  same = reference_grads(q, k, v, jnp.float32(0.25), math_dtype=dtype)
  for name, g, w, sp in zip(("out", "rem", "dq", "dk", "dv", "dscale"), got, want, same):
    if name == "rem":
      np.testing.assert_allclose(g, w, atol=1e-6)
    else:
      assert_within_tolerance(rel_rms(g, w), rel_rms(sp, w), dtype, name)


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


@pytest.mark.parametrize("dtype,logit_scale", [(jnp.float32, 4.0), (jnp.bfloat16, 300.0)],
                         ids=["fp32-strong", "bf16-saturated"])
def test_skipping_a_used_stick_is_exact(dtype, logit_scale):
  """Positive logits use the stick up within a few keys: skipping the rest changes no bit, and
  both stay within the tolerance rule against float64 (|z| reaches ~1e3 in the saturated case)."""
  shape = Shape(1, 150, 2, 1, 16)
  q, k, v, _ = random_inputs(0, shape, jnp.float32, logit_scale=logit_scale)
  q, k, v = (q + 3.0).astype(dtype), (k + 1.0).astype(dtype), v.astype(dtype)
  rng = np.random.default_rng(1)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  run = jax.jit(functools.partial(_grads, d_out=d_out, d_rem=d_rem), static_argnums=4)
  skipped = run(q, k, v, None, SMALL_BLOCKS)
  full = run(q, k, v, None, dataclasses.replace(SMALL_BLOCKS, skip_used_stick=False))
  assert float(jnp.min(skipped[1])) == 0.0  # the stick really is used up
  chex.assert_trees_all_equal(skipped, full)

  _assert_close_to_float64(skipped, q, k, v, d_out, d_rem)


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
