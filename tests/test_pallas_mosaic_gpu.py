"""The Pallas Mosaic GPU kernels, forward and backward: Mosaic GPU interpret mode on the CPU
against float64 (each kernel structure and tiling, skipping, the gate, segments), the race
detector on the TMA rings, the lowering for Hopper without a GPU, tile helpers, and what the op
rejects. On an NVIDIA GPU the same accuracy tests run the compiled kernels (``INTERPRET`` is
False there), plus a longer sequence (GPU only). The shared suite (tests/test_op_accuracy.py)
runs them too. Interpret mode costs ~0.3 s per (head, key tile): shapes stay small.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType
import numpy as np
import pytest

import sbjax
from sbjax import context_parallel, reference
from sbjax.kernels import pallas_mosaic_gpu, pallas_mosaic_gpu_bwd, pallas_mosaic_gpu_fwd
from sbjax.kernels import pallas_mosaic_gpu_tiles as tiles
from sbjax.kernels.pallas_mosaic_gpu_config import MosaicBlockSizes
from sbjax.platform import on_nvidia_gpu
from sbjax.testing import (
    RESULT_NAMES, Shape, assert_gradients_within_tolerance, float64_gradients, float64_result,
    gradients, random_inputs, same_precision_gradients, same_precision_result,
    skip_tolerance_bounds)

from helpers import far_inputs

_H200 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                     abstract_device=AbstractDevice("NVIDIA H200", None, "cuda"))


INTERPRET = not on_nvidia_gpu()
# The two kernel structures: one warpgroup issuing its own copies, and FA3's two consumers with a
# producer warpgroup (three K/V slots).
ONE_WG, TWO_WGS = MosaicBlockSizes(), MosaicBlockSizes(num_compute_warpgroups=2, num_buffers=3)
# FlashAttention-3's scheduling on top: the next q k^T issued before the stick terms (one
# warpgroup, three slots), and with the two consumers' ping-pong barrier as well.
ONE_WG_PIPE = MosaicBlockSizes(pipeline_qk=True, num_buffers=3)
TWO_WGS_FA3 = MosaicBlockSizes(num_compute_warpgroups=2, num_buffers=2, pipeline_qk=True,
                               schedule_barrier=True)
# a @ v accumulated in place (pl.run_state): compiled on a GPU; interpret mode adds instead, so
# on the CPU only the lowering tests see this path.
IN_PLACE = dataclasses.replace(TWO_WGS_FA3, accumulate_in_place=True)
# Longest causal walks launched first.
HEAVY_FIRST = MosaicBlockSizes(heavy_first=True)
# What the op takes when given no block_sizes: two consumers, pipelined q k^T, in place, heavy
# walks first.
DEFAULT = MosaicBlockSizes.get_default(128, jnp.bfloat16)


def _ids(b: MosaicBlockSizes) -> str:
  return (f"wgs{b.num_compute_warpgroups}" + "-pipe" * b.pipeline_qk
          + "-pingpong" * b.schedule_barrier + "-inplace" * b.accumulate_in_place
          + f"-bk{b.block_k}" * (b.block_k != 64) + "-heavyfirst" * b.heavy_first
          + "-dense" * (not b.skip_used_stick))


def _dense(b: MosaicBlockSizes) -> MosaicBlockSizes:
  return dataclasses.replace(b, skip_used_stick=False)


@functools.partial(jax.jit, static_argnames=("attend_current", "block_sizes", "skip_tolerance"))
def _mosaic(q, k, v, scale, attend_current, block_sizes=ONE_WG, skip_tolerance=0.0):
  return sbjax.stick_breaking_attention(
      q, k, v, scale=scale, attend_current=attend_current, implementation="pallas_mosaic_gpu",
      interpret=INTERPRET, return_remainder=True, block_sizes=block_sizes,
      skip_tolerance=skip_tolerance)


@functools.partial(jax.jit, static_argnames=("attend_current",))
def _same_precision(q, k, v, scale, attend_current):
  """The dense reference with its math in the input dtype: the tolerance rule's yardstick."""
  return reference.stick_breaking_attention(q, k, v, scale.astype(q.dtype), None, None,
                                            attend_current=attend_current, dtype=q.dtype)


def _assert_close_to_float64(q, k, v, scale, attend_current, block_sizes=ONE_WG, *,
                             oracle="xla"):
  got = _mosaic(q, k, v, jnp.float32(scale), attend_current, block_sizes)
  for name, x in zip(("out", "rem"), got):
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
  assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
  want = float64_result(q, k, v, None, scale, attend_current, implementation=oracle)
  same = _same_precision(q, k, v, jnp.float32(scale), attend_current)
  assert_gradients_within_tolerance(got, want, same, q.dtype, names=("out", "rem"))
  return got


# (dtype, shape, attend_current, block sizes): T not a multiple of the block, MQA and GQA, both
# head dims, fp16's two bf16 parts of the in-block sum, both kernel structures.
CASES = [
    (jnp.bfloat16, Shape(1, 130, 2, 1, 64), False, ONE_WG),
    (jnp.float16, Shape(1, 100, 4, 2, 128), True, ONE_WG),
    (jnp.bfloat16, Shape(1, 200, 2, 1, 128), True, TWO_WGS),
    (jnp.float16, Shape(1, 130, 2, 1, 64), False, ONE_WG_PIPE),
    (jnp.bfloat16, Shape(1, 200, 2, 1, 128), False, TWO_WGS_FA3),
    (jnp.float16, Shape(1, 130, 1, 1, 64), True,
     MosaicBlockSizes(num_compute_warpgroups=2, schedule_barrier=True, heavy_first=True)),
    (jnp.bfloat16, Shape(1, 130, 1, 1, 64), False, HEAVY_FIRST),
    (jnp.bfloat16, Shape(1, 200, 2, 1, 128), True, DEFAULT),
]


@pytest.mark.parametrize(
    "dtype,shape,attend_current,block_sizes", CASES,
    ids=[f"{jnp.dtype(d).name}-{s}-cur{int(c)}-{_ids(b)}" for d, s, c, b in CASES])
def test_forward_matches_float64(dtype, shape, attend_current, block_sizes):
  q, k, v, _ = random_inputs(1, shape, dtype, logit_scale=2.0)
  _assert_close_to_float64(q, k, v, 0.3, attend_current, block_sizes)


@pytest.mark.parametrize("block_sizes", [ONE_WG, TWO_WGS_FA3], ids=_ids)
def test_segment_ids_match_float64(block_sizes):
  """Segment ids (sorted runs, as packed documents; then shuffled, so that other segments' keys
  lie inside every block) through the public op."""
  shape = Shape(2, 130, 2, 1, 64)
  q, k, v, seg = random_inputs(4, shape, jnp.bfloat16, segments=True, logit_scale=2.0)
  shuffled = jnp.asarray(np.random.default_rng(0).permutation(np.asarray(seg).T).T)
  run = jax.jit(lambda q, k, v, s, ids: sbjax.stick_breaking_attention(
      q, k, v, scale=s, segment_ids=ids, implementation="pallas_mosaic_gpu",
      block_sizes=block_sizes, interpret=INTERPRET, return_remainder=True))
  same = jax.jit(lambda q, k, v, seg: reference.stick_breaking_attention(
      q, k, v, jnp.bfloat16(0.3), seg, None, dtype=q.dtype))
  for ids in (seg, shuffled):
    got = run(q, k, v, jnp.float32(0.3), ids)
    for name, x in zip(("out", "rem"), got):
      assert np.isfinite(np.asarray(x, np.float32)).all(), name
    want = float64_result(q, k, v, ids, 0.3, False)
    assert_gradients_within_tolerance(got, want, same(q, k, v, ids), q.dtype, names=("out", "rem"))


def _strong_inputs(seed, shape):
  """bf16 inputs with logits ~ 2 + N(0, 1) at scale 0.0625: each key takes ~90% of what is left,
  so every row's stick is below 2^-152 after ~50 keys."""
  q, k, v, _ = random_inputs(seed, shape, jnp.float32, logit_scale=2.0)
  return (q + 1.0).astype(jnp.bfloat16), (k + 0.5).astype(jnp.bfloat16), v.astype(jnp.bfloat16)


# The four walks that end differently: one warpgroup testing its own stick (pipelined or not) and
# two consumers whose producer ends the walk (pipelined or not).
SKIP_CASES = [ONE_WG, ONE_WG_PIPE, TWO_WGS, DEFAULT]


@pytest.mark.parametrize("block_sizes", SKIP_CASES, ids=_ids)
def test_skipping_a_used_stick_is_exact(block_sizes):
  """Once every row's stick is below 2^-152 the walk ends; the farther weights are exactly 0 in
  fp32, so the result equals the dense walk's bit for bit, and stays within the tolerance rule
  against float64. Logits ~ -1: a stick loses ~0.45 bits per key and runs out after ~340 keys,
  so at T = 640 (ten key blocks) the later query blocks end their walks four or five blocks
  early (a walk ended at a stick of 2^-100 would leave rem ~ 2^-100 where the dense walk has 0)."""
  q, k, v = far_inputs(6, Shape(1, 640, 2, 1, 64), shift=-1.0, dtype=jnp.bfloat16)
  skipped = _mosaic(q, k, v, jnp.float32(0.25), False, block_sizes)
  full = _mosaic(q, k, v, jnp.float32(0.25), False, _dense(block_sizes))
  for name, x in zip(("out", "rem"), skipped):
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
  assert float(jnp.max(skipped[1][:, 400:])) == 0.0  # the late rows' sticks really are used up
  chex.assert_trees_all_equal(skipped, full)
  want = float64_result(q, k, v, None, 0.25, False)
  same = _same_precision(q, k, v, jnp.float32(0.25), False)
  assert_gradients_within_tolerance(skipped, want, same, q.dtype, names=("out", "rem"))


@pytest.mark.parametrize("block_sizes", [ONE_WG, DEFAULT], ids=_ids)
def test_cross_chunk_mode_matches_float64(block_sizes):
  """The fully visible cross-chunk mode of context parallelism (``chunk_attention(causal=False)``):
  every key of an earlier chunk, the stick broken from its last key; T=130 (the last key block
  partial: its padded keys masked), GQA, the queries' and keys' own segment ids (runs crossing
  the chunk boundary: query ids continue the keys'), a gate with infinities; against float64
  under the tolerance rule. Then far logits at T=640: the walks end four or five blocks early,
  bit for bit the dense walk."""
  shape = Shape(1, 130, 4, 2, 64)
  q, k, v, k_seg = random_inputs(9, shape, jnp.bfloat16, segments=True, logit_scale=2.0)
  q_seg = k_seg + k_seg[:, -1:]  # the keys' last segment goes on into the query chunk
  gate = jnp.asarray(_gate(shape), jnp.float32)

  def run(q, k, v, sizes, **extra):
    return jax.jit(lambda q, k, v: context_parallel.chunk_attention(
        q, k, v, causal=False, scale=0.3, implementation="pallas_mosaic_gpu",
        interpret=INTERPRET, block_sizes=sizes, **extra))(q, k, v)

  for segments in (True, False):  # without them, only the padding mask hides the padded keys
    seg = dict(segment_ids=q_seg, key_segment_ids=k_seg) if segments else {}
    got = run(q, k, v, block_sizes, forget_gate=gate, **seg)
    for name, x in zip(("out", "rem"), got):
      assert np.isfinite(np.asarray(x, np.float32)).all(), name
    oracle = (q, k, v, seg.get("segment_ids"), 0.3, False, gate)
    cross = dict(causal=False, key_segment_ids=seg.get("key_segment_ids"))
    assert_gradients_within_tolerance(got, float64_result(*oracle, **cross),
                                      same_precision_result(*oracle, **cross), q.dtype,
                                      names=("out", "rem"))
    assert float(jnp.max(got[1])) > 0.0 and float(jnp.min(got[1])) < 1.0  # neither all nor none

  q, k, v = far_inputs(6, Shape(1, 640, 2, 1, 64), shift=-1.0, dtype=jnp.bfloat16)
  skipped = run(q, k, v, block_sizes)
  assert float(jnp.max(skipped[1])) == 0.0  # every stick is used up within the chunk
  chex.assert_trees_all_equal(skipped, run(q, k, v, _dense(block_sizes)))


def test_cross_chunk_gradients_match_float64(block_sizes=ONE_WG):
  """The backward kernels in the cross-chunk mode (every query block against every key block
  with real keys): T=130 (the padded keys masked in the dq walk's first block and in the dk/dv
  kernel's last key block), GQA, a gate with infinities, with and without the queries' and keys'
  own segment ids; against float64 under the tolerance rule. Then exact skipping of the
  gradients, bit for bit the dense walk's. (The dk/dv kernel's 64-key tiles share the masks and
  walks: their causal tests cover them.)"""
  shape = Shape(1, 130, 4, 2, 64)
  q, k, v, k_seg = random_inputs(9, shape, jnp.bfloat16, segments=True, logit_scale=2.0)
  q_seg = k_seg + k_seg[:, -1:]  # the keys' last segment goes on into the query chunk
  gate = jnp.asarray(_gate(shape), jnp.float32)
  d_out, d_rem = _cotangents(q)

  def grads(q, k, v, gate, sizes, **seg):
    fn = lambda q, k, v, s, g: context_parallel.chunk_attention(
        q, k, v, causal=False, scale=s, forget_gate=g, implementation="pallas_mosaic_gpu",
        interpret=INTERPRET, block_sizes=sizes, **seg)
    return jax.jit(functools.partial(gradients, fn))(q, k, v, jnp.float32(0.3), d_out, d_rem,
                                                     gate)

  names = RESULT_NAMES + ("dforget_gate",)
  for seg in (dict(segment_ids=q_seg, key_segment_ids=k_seg), {}):
    got = grads(q, k, v, gate, block_sizes, **seg)
    for name, x in zip(names, got):
      assert np.isfinite(np.asarray(x, np.float32)).all(), name
    oracle = (q, k, v, seg.get("segment_ids"), 0.3, False, d_out, d_rem, gate)
    cross = dict(causal=False, key_segment_ids=seg.get("key_segment_ids"))
    assert_gradients_within_tolerance(got, float64_gradients(*oracle, **cross),
                                      same_precision_gradients(*oracle, **cross), q.dtype,
                                      names=names)

  q, k, v = far_inputs(6, Shape(1, 640, 1, 1, 64), shift=-1.0, dtype=jnp.bfloat16)
  d_out, d_rem = _cotangents(q)
  gate = jnp.zeros(q.shape[:2] + (1,), jnp.float32) + 30.0  # open: sigmoid(30) = 1 in fp32
  skipped = grads(q, k, v, gate, block_sizes)
  assert float(jnp.max(skipped[1])) == 0.0  # every stick is used up within the chunk
  chex.assert_trees_all_equal(skipped, grads(q, k, v, gate, _dense(block_sizes)))


@pytest.mark.parametrize("block_sizes", [ONE_WG_PIPE, DEFAULT], ids=_ids)
def test_skip_tolerance_bounds_the_error(block_sizes):
  """``skip_tolerance`` ends walks whose sticks last long (exact skipping cannot: the float64
  sticks stay above 2^-152) within its bound: against the dense walk of the same kernel,
  ``|d out| <= tol max|v|`` (plus an ulp of each rounded output) and ``0 <= d rem <= tol``."""
  tolerance = 1e-2
  q, k, v = far_inputs(0, Shape(1, 640, 2, 1, 64), shift=-3.5, dtype=jnp.bfloat16)
  got = _mosaic(q, k, v, jnp.float32(0.25), False, block_sizes, tolerance)
  dense = _mosaic(q, k, v, jnp.float32(0.25), False, _dense(block_sizes))
  (out, rem), (out_d, rem_d) = ([np.asarray(x, np.float64) for x in r] for r in (got, dense))
  assert np.isfinite(out).all() and np.isfinite(rem).all()
  ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(out_d), 1e-30))) - 7)  # bf16: 7 bits
  excess = np.abs(out - out_d) - tolerance * np.abs(np.asarray(v, np.float64)).max() - ulp
  assert excess.max() <= 0, f"out: error above the bound by {excess.max():.3g}"
  assert (rem >= rem_d - 1e-6).all() and (rem - rem_d <= tolerance).all()
  stopped = rem > 2.0 * rem_d  # rows whose walk ended early
  assert stopped.mean() >= 0.1, stopped.mean()
  assert rem_d.min() > 2.0 ** -152  # exact skipping could not have ended any walk


def _cotangents(shape_like, seed=1):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape_like.shape), jnp.float32),
          jnp.asarray(rng.normal(size=shape_like.shape[:3]), jnp.float32))


@functools.partial(jax.jit, static_argnames=("attend_current", "block_sizes", "skip_tolerance"))
def _mosaic_gradients(q, k, v, scale, d_out, d_rem, segment_ids=None, forget_gate=None, *,
                      attend_current=False, block_sizes=ONE_WG, skip_tolerance=0.0):
  """``(out, rem, dq, dk, dv, dscale[, dforget_gate])`` of the op on the Mosaic GPU kernels."""
  fn = lambda q, k, v, s, g: sbjax.stick_breaking_attention(
      q, k, v, scale=s, segment_ids=segment_ids, forget_gate=g, attend_current=attend_current,
      implementation="pallas_mosaic_gpu", interpret=INTERPRET, return_remainder=True,
      block_sizes=block_sizes, skip_tolerance=skip_tolerance)
  return gradients(fn, q, k, v, scale, d_out, d_rem, forget_gate)


# (dtype, shape, attend_current, segments, block sizes): the backward's 64-row tiles with T not a
# multiple of 64, GQA and MQA, both head dims, fp16's two stick parts, segment ids in any order
# (shuffled, so other segments' keys lie inside every block), a deeper TMA ring, the dq kernel's
# 64-key tiles and the dk/dv kernel's undivided 64-key tiles (the defaults take 32-key halves).
DQ_64 = MosaicBlockSizes(block_k_dq=64)
DKV_64 = MosaicBlockSizes(block_k_dkv=64)
GRADIENT_CASES = [
    (jnp.bfloat16, Shape(1, 200, 4, 2, 64), False, None, ONE_WG),
    (jnp.float16, Shape(1, 130, 2, 1, 128), True, None, MosaicBlockSizes(num_buffers_bwd=3)),
    (jnp.bfloat16, Shape(2, 130, 2, 1, 64), False, "shuffled", DEFAULT),
    (jnp.bfloat16, Shape(1, 200, 4, 2, 64), True, "shuffled", DQ_64),
    (jnp.float16, Shape(1, 130, 4, 2, 128), False, "shuffled", DKV_64),
]


@pytest.mark.parametrize(
    "dtype,shape,attend_current,segments,block_sizes", GRADIENT_CASES,
    ids=[f"{jnp.dtype(d).name}-{s}-cur{int(c)}-seg{g}-bwdbuf{b.num_buffers_bwd}-dqk{b.block_k_dq}"
         f"-dkvk{b.block_k_dkv}" for d, s, c, g, b in GRADIENT_CASES])
def test_gradients_match_float64(dtype, shape, attend_current, segments, block_sizes):
  """Output, remainder and the gradients of q, k, v and the scale, under random cotangents on
  both outputs, against float64 under the tolerance rule."""
  q, k, v, seg = random_inputs(3, shape, dtype, segments=segments is not None, logit_scale=2.0)
  if segments == "shuffled":
    seg = jnp.asarray(np.random.default_rng(0).permutation(np.asarray(seg).T).T)
  d_out, d_rem = _cotangents(q)
  got = _mosaic_gradients(q, k, v, jnp.float32(0.3), d_out, d_rem, seg,
                          attend_current=attend_current, block_sizes=block_sizes)
  for name, x in zip(RESULT_NAMES, got):
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
  want = float64_gradients(q, k, v, seg, 0.3, attend_current, d_out, d_rem)
  same = same_precision_gradients(q, k, v, seg, 0.3, attend_current, d_out, d_rem)
  assert_gradients_within_tolerance(got, want, same, dtype)


@pytest.mark.parametrize("block_sizes", [ONE_WG, DQ_64], ids=["dqk32", "dqk64"])
def test_backward_skipping_is_exact(block_sizes):
  """The dq walk ends where every row's stick is below 2^-152 and the dk/dv kernel visits only
  the query blocks whose walk reached its key block: the gradients equal the dense walk's bit
  for bit (the far inputs of test_skipping_a_used_stick_is_exact: the late query blocks end
  four or five key blocks early)."""
  q, k, v = far_inputs(6, Shape(1, 640, 2, 1, 64), shift=-1.0, dtype=jnp.bfloat16)
  d_out, d_rem = _cotangents(q)
  skipped = _mosaic_gradients(q, k, v, jnp.float32(0.25), d_out, d_rem, block_sizes=block_sizes)
  full = _mosaic_gradients(q, k, v, jnp.float32(0.25), d_out, d_rem,
                           block_sizes=_dense(block_sizes))
  assert float(jnp.max(skipped[1][:, 400:])) == 0.0  # the late rows' sticks really are used up
  chex.assert_trees_all_equal(skipped, full)
  want = float64_gradients(q, k, v, None, 0.25, False, d_out, d_rem)
  same = same_precision_gradients(q, k, v, None, 0.25, False, d_out, d_rem)
  assert_gradients_within_tolerance(skipped, want, same, q.dtype)


def test_backward_skip_tolerance_within_its_bounds():
  """With ``skip_tolerance`` the gradients are those of the truncated sum: within
  ``testing.skip_tolerance_bounds`` of float64, element by element, on top of the dense walk's
  own bf16 error (measured against float64 the same way)."""
  tolerance = 1e-2
  q, k, v = far_inputs(0, Shape(1, 640, 2, 1, 64), shift=-3.5, dtype=jnp.bfloat16)
  d_out, d_rem = _cotangents(q)
  got = _mosaic_gradients(q, k, v, jnp.float32(0.25), d_out, d_rem, skip_tolerance=tolerance)
  dense = _mosaic_gradients(q, k, v, jnp.float32(0.25), d_out, d_rem, block_sizes=_dense(ONE_WG))
  want = float64_gradients(q, k, v, None, 0.25, False, d_out, d_rem)
  bounds = skip_tolerance_bounds(q, k, v, 0.25, d_out, d_rem, tolerance)
  for name, g, d, w, bound in zip(RESULT_NAMES, got, dense, want, bounds):
    g, d = np.asarray(g, np.float64), np.asarray(d, np.float64)
    assert np.isfinite(g).all(), name
    excess = np.abs(g - w) - bound - np.abs(d - w).max()
    assert excess.max() <= 0, f"{name}: error above the bound by {excess.max():.3g}"
  stopped = np.asarray(got[1]) > 2.0 * np.asarray(dense[1])  # rows whose walk ended early
  assert stopped.mean() >= 0.1, stopped.mean()


@pytest.mark.parametrize("block_sizes", [ONE_WG, DQ_64, DKV_64], ids=["dqk32", "dqk64", "dkvk64"])
def test_gate_gradients_match_float64(block_sizes):
  """The gate's gradient (and the others) with infinite and large gates, GQA, attend_current, T
  not a multiple of 64, against float64 under the tolerance rule; an open gate (+inf) gets no
  gradient."""
  shape = Shape(1, 150, 4, 2, 64)
  q, k, v, _ = random_inputs(8, shape, jnp.bfloat16, logit_scale=2.0)
  gate = _gate(shape)
  d_out, d_rem = _cotangents(q)
  got = _mosaic_gradients(q, k, v, jnp.float32(0.3), d_out, d_rem, None, gate,
                          attend_current=True, block_sizes=block_sizes)
  for name, x in zip(RESULT_NAMES + ("dforget_gate",), got):
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
  want = float64_gradients(q, k, v, None, 0.3, True, d_out, d_rem, gate)
  same = same_precision_gradients(q, k, v, None, 0.3, True, d_out, d_rem, gate)
  assert_gradients_within_tolerance(got, want, same, q.dtype,
                                    names=RESULT_NAMES + ("dforget_gate",))
  np.testing.assert_array_equal(np.asarray(got[-1])[np.asarray(gate) == np.inf], 0.0)


def _gate(shape, seed=2):
  """Forget-gate logits ``[B, T, K]``: N(1, 3^2), with some at +-inf (the ungated stick; a key
  that takes nothing) and +-30."""
  g = np.random.default_rng(seed).normal(size=(shape.b, shape.t, shape.k)) * 3.0 + 1.0
  flat = g.reshape(-1)
  flat[1::7], flat[3::11], flat[4::13], flat[5::17] = np.inf, -np.inf, 30.0, -30.0
  return jnp.asarray(g, jnp.float32)


@pytest.mark.parametrize("block_sizes", [ONE_WG, TWO_WGS, DEFAULT], ids=_ids)
def test_forget_gate_matches_float64(block_sizes):
  """``beta_ji = sigmoid(g_i) sigmoid(z_ji)`` with infinite and large gates, GQA, against float64
  under the tolerance rule; exact skipping (a gate only slows the stick) equals the dense walk
  bit for bit."""
  shape = Shape(1, 330, 4, 2, 64)
  q, k, v, _ = random_inputs(8, shape, jnp.bfloat16, logit_scale=2.0)
  gate = _gate(shape)
  run = jax.jit(lambda q, k, v, g, sizes: sbjax.stick_breaking_attention(
      q, k, v, scale=0.3, forget_gate=g, implementation="pallas_mosaic_gpu", interpret=INTERPRET,
      block_sizes=sizes, return_remainder=True), static_argnums=4)
  got = run(q, k, v, gate, block_sizes)
  for name, x in zip(("out", "rem"), got):
    assert np.isfinite(np.asarray(x, np.float32)).all(), name
  want = float64_result(q, k, v, None, 0.3, False, gate)
  same = jax.jit(lambda q, k, v, g: reference.stick_breaking_attention(
      q, k, v, jnp.bfloat16(0.3), None, g, dtype=q.dtype))(q, k, v, gate)
  assert_gradients_within_tolerance(got, want, same, q.dtype, names=("out", "rem"))
  chex.assert_trees_all_equal(got, run(q, k, v, gate, _dense(block_sizes)))


@pytest.mark.skipif(INTERPRET, reason="compiled kernel only (interpret mode is too slow)")
@pytest.mark.parametrize(
    "block_sizes", [ONE_WG, TWO_WGS, MosaicBlockSizes(operands_in_registers=False), ONE_WG_PIPE,
                    TWO_WGS_FA3, MosaicBlockSizes(num_compute_warpgroups=2, schedule_barrier=True),
                    dataclasses.replace(TWO_WGS_FA3, block_k=128), IN_PLACE,
                    MosaicBlockSizes(pipeline_qk=True, num_buffers=3, accumulate_in_place=True),
                    DEFAULT],
    ids=["wgs1", "wgs2", "smem", "wgs1-pipe", "wgs2-pipe-pingpong", "wgs2-pingpong",
         "wgs2-pipe-pingpong-bk128", "wgs2-pipe-pingpong-inplace", "wgs1-pipe-inplace",
         "default"])
def test_long_sequence_on_gpu(block_sizes):
  """T = 2048 (not a multiple of 128), GQA, H = 128: the compiled kernel against float64 (the scan
  path as the oracle) under the tolerance rule."""
  q, k, v, _ = random_inputs(5, Shape(1, 2000, 4, 2, 128), jnp.bfloat16, logit_scale=2.0)
  _assert_close_to_float64(q, k, v, 0.3, False, block_sizes, oracle="scan")


def test_log_sigmoid_is_zero_above_the_cut(monkeypatch):
  """Above the softplus cut ``log2 sigmoid`` is exactly 0 however ``x - softplus(x)`` rounds:
  compiled, ``x = q.k * scale`` can be fused into that subtraction (an FMA), which returns the
  product's rounding error instead of 0; here the softplus's ``x`` is nudged by 2^-20 relative
  to emulate it. (With ``x - sp`` it gave ``s = 1 - 1.7e-4`` on the GPU, and the saturated-logit
  ``dscale`` was 15x its size off.) Below the cut the terms are those of the formula."""
  x = jnp.asarray([-50.0, -3.0, 0.0, 5.0, 21.0, 22.0, 500.0, 5000.0, np.inf], jnp.float32)
  want_s, want_1m_s = (np.asarray(a) for a in tiles.sigmoid_terms(x))
  real = tiles.softplus2
  monkeypatch.setattr(tiles, "softplus2",
                      lambda x: jnp.where(x > tiles.SOFTPLUS_CUT, x * (1 + 2.0**-20), real(x)))
  log_s, log_1m_s = (np.asarray(a) for a in tiles.sigmoid_terms(x))
  above = np.asarray(x) > tiles.SOFTPLUS_CUT
  np.testing.assert_array_equal(log_s[above], 0.0)
  np.testing.assert_array_equal(log_s[~above], want_s[~above])
  np.testing.assert_array_equal(log_1m_s[~above], want_1m_s[~above])
  np.testing.assert_allclose(want_s[~above], np.log2(1 / (1 + np.exp(-np.asarray(x)[~above]
                                                                   / tiles.LOG2E))), rtol=1e-5,
                             atol=1e-6)


def test_bf16_parts_are_exact():
  """``tiles.bf16_parts`` in a kernel (compiled on a GPU): 3 parts sum to fp32 ``x`` exactly and 2
  keep 16 bits, over 60 binary orders of magnitude; and the in-block sums of 3 parts through the
  tensor cores (registers on a GPU) give a lone term back exactly, as the backward's
  cancellation-free ``dz`` at saturated logits needs."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 64)) * np.exp2(rng.uniform(-30, 30, (64, 64))), jnp.float32)
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def kernel(x_ref, three_ref, two_ref, first_ref, tri_smem, part_smem):
    x = plgpu.load(x_ref, layout=plgpu.Layout.WGMMA, optimized=False)
    f32 = lambda terms: functools.reduce(lambda a, b: a + b, [t.astype(jnp.float32) for t in terms])
    three_ref[...] = f32(tiles.bf16_parts(x, 3))
    two_ref[...] = f32(tiles.bf16_parts(x, 2))
    tiles.build_triangle(tri_smem, lambda m, i: m <= i)  # column 0 sums x[:, 0] alone
    first_ref[...] = tiles.in_block_sums(x, tri_smem, parts=3, smem=part_smem,
                                         registers=not INTERPRET)

  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  three, two, first = (np.asarray(a) for a in pl.pallas_call(
      kernel, out_shape=(out,) * 3,
      scratch_shapes=[plgpu.SMEM(x.shape, jnp.bfloat16, transforms=transforms)] * 2,
      interpret=plgpu.InterpretGPUParams() if INTERPRET else False)(x))
  x = np.asarray(x)
  np.testing.assert_array_equal(three, x)
  assert np.all(np.abs(two - x) <= 2.0**-16 * np.abs(x)) and np.any(two != x)
  np.testing.assert_array_equal(first[:, 0], x[:, 0])


def test_large_logits():
  """Logits of magnitude ~100 (sticks used up after a key or two, many weights exactly 0) under
  the tolerance rule; then saturated ones, |z| = 1e4: out_j = v_{j-1} and rem = 0, or out = 0 and
  rem = 1, as in the shared suite's test_saturated_logits."""
  shape = Shape(2, 70, 1, 1, 64)  # one shape for both parts: one compile
  q, k, v, _ = random_inputs(2, shape, jnp.bfloat16, logit_scale=16.0)
  _assert_close_to_float64(q, k, v, 1.0, False)

  # batch 0: every logit +1e4; batch 1: every logit -1e4
  u = np.ones(64, np.float32) / 8.0
  k = jnp.asarray(np.broadcast_to(u, (2, 70, 1, 64)), jnp.bfloat16)
  q = jnp.asarray(np.array([1e4, -1e4])[:, None, None, None] * u, jnp.bfloat16)
  q = jnp.broadcast_to(q, (2, 70, 1, 64))
  out, rem = _mosaic(q, k, v, jnp.float32(1.0), False)
  out, rem = np.asarray(out, np.float32), np.asarray(rem)
  assert np.isfinite(out).all() and np.isfinite(rem).all()
  np.testing.assert_array_equal(out[0, 1:], np.asarray(v[0, :-1], np.float32))
  np.testing.assert_array_equal(out[0, 0], 0.0)
  np.testing.assert_array_equal(rem[0, 1:], 0.0)
  np.testing.assert_array_equal(rem[0, 0], 1.0)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_array_equal(rem[1], 1.0)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's race detector: runs on the CPU")
@pytest.mark.parametrize("walk_ends", [False, True], ids=["full-walks", "walks-end"])
@pytest.mark.parametrize("block_sizes", [ONE_WG, TWO_WGS, ONE_WG_PIPE, TWO_WGS_FA3], ids=_ids)
def test_tma_ring_has_no_races(block_sizes, walk_ends):
  """The K/V ring's synchronisation in the interpreter: its race detector (TMA copies, register
  loads and stores; it does not see wgmma's SMEM operand reads) and its barrier checks, which fail
  a kernel whose barrier phases complete unobserved (a producer that refills a slot without
  waiting for its consumers fails that way). Four key blocks, two or three slots; six with
  ``walk_ends`` (sticks used up early: the walks end, with the two consumers' stick ring and go
  flags, and the prefetched copies past the end are waited for)."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
  if walk_ends:
    q, k, v = _strong_inputs(3, Shape(1, 384, 1, 1, 64))
  else:
    q, k, v, _ = random_inputs(3, Shape(1, 256, 1, 1, 64), jnp.bfloat16)
  mgpu_interpret.reset_gpu_interpret_mode_state()
  out, _ = pallas_mosaic_gpu_fwd.forward(
      q, k, v, jnp.float32([0.0625 if walk_ends else 0.125]), attend_current=False,
      block_sizes=block_sizes, interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(out)
  assert not mgpu_interpret.get_races().races_found


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's race detector: runs on the CPU")
@pytest.mark.parametrize("walk_ends", [False, True], ids=["full-walks", "walks-end"])
def test_backward_rings_have_no_races(walk_ends):
  """The backward kernels' TMA rings (K/V in the dq kernel, q/do and the records in the dk/dv
  kernel, over the heads of a GQA group) and the dq kernel's record stores, under the
  interpreter's race detector and barrier checks; with ``walk_ends`` the dq walks end early and
  the copies prefetched past the end are waited for."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
  if walk_ends:
    q, k, v = _strong_inputs(3, Shape(1, 384, 2, 1, 64))
  else:
    q, k, v, _ = random_inputs(3, Shape(1, 256, 2, 1, 64), jnp.bfloat16)
  d_out, d_rem = _cotangents(q)
  mgpu_interpret.reset_gpu_interpret_mode_state()
  grads = pallas_mosaic_gpu_bwd.backward(
      q, k, v, jnp.float32([0.0625 if walk_ends else 0.125]), None, None, d_out.astype(q.dtype),
      d_rem.transpose(0, 2, 1), attend_current=False, block_sizes=ONE_WG, skip_tolerance=0.0,
      interpret=plgpu.InterpretGPUParams(detect_races=True))
  jax.block_until_ready(grads[:3])
  assert not mgpu_interpret.get_races().races_found


@pytest.mark.parametrize("dtype,head_dim,block_sizes", [
    (jnp.bfloat16, 64, ONE_WG), (jnp.float16, 128, ONE_WG), (jnp.bfloat16, 128, TWO_WGS),
    (jnp.float16, 64, TWO_WGS), (jnp.bfloat16, 128, MosaicBlockSizes(operands_in_registers=False)),
    (jnp.float16, 128, MosaicBlockSizes(block_k=128, num_compute_warpgroups=2)),
    (jnp.bfloat16, 128, ONE_WG_PIPE), (jnp.float16, 128, TWO_WGS_FA3),
    (jnp.bfloat16, 64, MosaicBlockSizes(num_compute_warpgroups=2, schedule_barrier=True)),
    (jnp.bfloat16, 128, dataclasses.replace(TWO_WGS_FA3, block_k=128)),
    (jnp.bfloat16, 128, dataclasses.replace(IN_PLACE, block_k=128, consumer_registers=240)),
    (jnp.float16, 64, MosaicBlockSizes(pipeline_qk=True, num_buffers=3,
                                       accumulate_in_place=True, heavy_first=True)),
    (jnp.float16, 64, DEFAULT)],
    ids=["bf16-64-wgs1", "fp16-128-wgs1", "bf16-128-wgs2", "fp16-64-wgs2", "bf16-128-smem",
         "fp16-128-wgs2-bk128", "bf16-128-wgs1-pipe", "fp16-128-wgs2-pipe-pingpong",
         "bf16-64-wgs2-pingpong", "bf16-128-wgs2-pipe-pingpong-bk128",
         "bf16-128-wgs2-pipe-pingpong-inplace-bk128-reg240", "fp16-64-wgs1-pipe-inplace-heavyfirst",
         "fp16-64-default"])
def test_lowers_for_hopper(dtype, head_dim, block_sizes):
  """Lowering for an H200 on the CPU runs Pallas's Mosaic GPU lowering and the Mosaic GPU dialect
  lowering (layouts, wgmma operand and swizzle checks) and emits one ``mosaic_gpu_v2`` custom call
  with the kernel's name; it also checks the SMEM budget (the bk128 case fits only with one
  shared triangle). It does not compile to PTX (that needs a GPU). This is the only CPU check of
  the register-operand wgmma, which interpret mode cannot run (it takes SMEM there)."""
  text = _lowered_for_hopper(dtype, head_dim, block_sizes)
  assert len(re.findall(r"custom_call @mosaic_gpu_v2", text)) == 1
  assert pallas_mosaic_gpu_fwd.NAME in text


def test_no_block_sizes_means_the_tuned_tiling(monkeypatch):
  assert DEFAULT.num_compute_warpgroups == 2 and DEFAULT.pipeline_qk and DEFAULT.heavy_first
  seen = []

  def launch(q, k, v, scale, segment_ids, key_segment_ids, forget_gate, static):  # records static
    seen.append(static)
    b, t, n, _ = q.shape
    return jnp.zeros_like(q), jnp.zeros((b, n, t), jnp.float32)

  monkeypatch.setattr(pallas_mosaic_gpu, "_attention", launch)
  q = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
  pallas_mosaic_gpu.stick_breaking_attention(q, q, q, 0.1)
  assert seen[-1][1] == DEFAULT


def _lowered_for_hopper(dtype, head_dim, block_sizes):
  """The op lowered for an H200 (StableHLO text), on the CPU."""
  sd = jax.ShapeDtypeStruct
  args = (sd((2, 200, 4, head_dim), dtype), sd((2, 200, 2, head_dim), dtype),
          sd((2, 200, 2, head_dim), dtype), sd((), jnp.float32))
  fn = lambda q, k, v, s: sbjax.stick_breaking_attention(
      q, k, v, scale=s, attend_current=True, implementation="pallas_mosaic_gpu",
      return_remainder=True, block_sizes=block_sizes)
  with jax.sharding.use_abstract_mesh(_H200):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype,head_dim,extras,tiling", [
    (jnp.bfloat16, 128, False, {}), (jnp.float16, 64, True, {}),
    (jnp.bfloat16, 128, True, dict(block_k_dq=64)),
    (jnp.bfloat16, 128, True, dict(block_k_dkv=64))],
    ids=["bf16-128", "fp16-64-seg-gate", "bf16-128-seg-gate-dqk64", "bf16-128-seg-gate-dkvk64"])
def test_backward_lowers_for_hopper(dtype, head_dim, extras, tiling):
  """The forward and both backward kernels under ``jax.value_and_grad`` pass the Mosaic GPU
  lowering for an H200 (with segment ids and a gate: their loads in both backward kernels; the
  32-key tiles, whose operands all take a 64-byte swizzle: the dq kernel's default and the dk/dv
  kernel's halves, whose A and dz stores fill one 32-key column of a tile each)."""
  sd = jax.ShapeDtypeStruct
  args = (sd((2, 200, 4, head_dim), dtype), sd((2, 200, 2, head_dim), dtype),
          sd((2, 200, 2, head_dim), dtype), sd((2, 200), jnp.int32) if extras else None,
          sd((2, 200, 2), jnp.float32) if extras else None)

  def loss(q, k, v, seg, gate):
    out, rem = pallas_mosaic_gpu.stick_breaking_attention(
        q, k, v, 0.1, seg, gate, block_sizes=dataclasses.replace(
            MosaicBlockSizes.get_default(head_dim, dtype), **tiling))
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(rem)
  fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 4) if extras else (0, 1, 2))
  with jax.sharding.use_abstract_mesh(_H200):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu_v2", text)) == 3
  for name in (pallas_mosaic_gpu_fwd.NAME, pallas_mosaic_gpu_bwd.DQ_NAME,
               pallas_mosaic_gpu_bwd.DKV_NAME):
    assert name in text


@pytest.mark.parametrize("block_sizes", [ONE_WG, TWO_WGS_FA3, DEFAULT], ids=_ids)
def test_segment_ids_and_gate_lower_for_hopper(block_sizes):
  """The segment-id and gate loads (GMEM, row and column layouts) pass the Mosaic GPU lowering."""
  sd = jax.ShapeDtypeStruct
  args = (sd((2, 200, 4, 128), jnp.bfloat16), sd((2, 200, 2, 128), jnp.bfloat16),
          sd((2, 200, 2, 128), jnp.bfloat16), sd((), jnp.float32), sd((2, 200), jnp.int32),
          sd((2, 200, 2), jnp.float32))
  fn = functools.partial(pallas_mosaic_gpu.stick_breaking_attention, attend_current=True,
                         block_sizes=block_sizes)
  with jax.sharding.use_abstract_mesh(_H200):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu_v2", text)) == 1


@pytest.mark.parametrize("block_sizes", [ONE_WG, DEFAULT], ids=_ids)
def test_cross_chunk_mode_lowers_for_hopper(block_sizes):
  """The cross-chunk forward and, under ``jax.grad``, both backward kernels (queries' and keys'
  segment ids in one row, a gate, T=200 with a partial last key block) pass the Mosaic GPU
  lowering."""
  sd = jax.ShapeDtypeStruct
  args = (sd((2, 200, 4, 128), jnp.bfloat16), sd((2, 200, 2, 128), jnp.bfloat16),
          sd((2, 200, 2, 128), jnp.bfloat16), sd((2, 200), jnp.int32), sd((2, 200), jnp.int32),
          sd((2, 200, 2), jnp.float32))
  fn = lambda q, k, v, q_seg, k_seg, gate: context_parallel.chunk_attention(
      q, k, v, causal=False, segment_ids=q_seg, key_segment_ids=k_seg, forget_gate=gate,
      implementation="pallas_mosaic_gpu", block_sizes=block_sizes)
  loss = lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32)) + jnp.sum(fn(*a)[1])
  with jax.sharding.use_abstract_mesh(_H200):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    grad_text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 5))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"custom_call @mosaic_gpu_v2", text)) == 1
  for name in (pallas_mosaic_gpu_bwd.DQ_NAME, pallas_mosaic_gpu_bwd.DKV_NAME):
    assert name in grad_text


def _kernels(fn, *args) -> set[str]:
  """The Pallas kernels (by name) in ``fn``'s jaxpr."""
  text = str(jax.make_jaxpr(fn)(*args))
  names = {"stick_breaking_fwd_mosaic_gpu", "stick_breaking_fwd", "stick_breaking_bwd_dq",
           "stick_breaking_bwd_dkv"}
  return {n for n in names if re.search(rf"\b{n}\b", text)}


def test_pallas_on_hopper_runs_mosaic_forward_and_triton_gradients(monkeypatch):
  """``implementation="pallas"`` on a Hopper GPU (on the CPU simulated, in interpret mode): the
  Mosaic GPU forward when not differentiated, bit for bit; the Triton forward and backward under
  differentiation, bit for bit; the Triton kernels for inputs Mosaic does not take, for given
  ``block_sizes``, and off Hopper."""
  from sbjax import ops
  q, k, v, _ = random_inputs(7, Shape(1, 200, 2, 1, 64), jnp.bfloat16, logit_scale=2.0)
  run = lambda impl, **kw: lambda q, k, v: sbjax.stick_breaking_attention(
      q, k, v, implementation=impl, interpret=INTERPRET, return_remainder=True, **kw)
  loss = lambda impl: lambda q, k, v: run(impl)(q, k, v)[0].astype(jnp.float32).sum()
  grads = lambda impl: jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1, 2)))
  if INTERPRET:
    assert _kernels(run("pallas"), q, k, v) == {"stick_breaking_fwd"}  # the CPU is no Hopper
    monkeypatch.setattr(ops, "on_hopper", lambda: True)
  assert _kernels(run("pallas"), q, k, v) == {"stick_breaking_fwd_mosaic_gpu"}
  chex.assert_trees_all_equal(jax.jit(run("pallas"))(q, k, v),
                              jax.jit(run("pallas_mosaic_gpu"))(q, k, v))
  assert _kernels(grads("pallas"), q, k, v) == {
      "stick_breaking_fwd", "stick_breaking_bwd_dq", "stick_breaking_bwd_dkv"}
  chex.assert_trees_all_equal(grads("pallas")(q, k, v), grads("pallas_triton")(q, k, v))
  assert _kernels(run("pallas", block_sizes=sbjax.BlockSizes()), q, k, v) == {"stick_breaking_fwd"}
  gate = jnp.asarray(np.random.default_rng(2).normal(size=q.shape[:2] + (1,)), jnp.float32)
  assert _kernels(run("pallas", forget_gate=gate), q, k, v) == {"stick_breaking_fwd_mosaic_gpu"}
  gated_loss = lambda impl: lambda q, k, v, g: run(impl, forget_gate=g)(q, k, v)[0].astype(
      jnp.float32).sum()
  gated = lambda impl: jax.jit(jax.grad(gated_loss(impl), argnums=(0, 1, 2, 3)))
  chex.assert_trees_all_equal(gated("pallas")(q, k, v, gate), gated("pallas_triton")(q, k, v, gate))
  assert _kernels(run("pallas"), *(x.astype(jnp.float32) for x in (q, k, v))) == {
      "stick_breaking_fwd"}
  # The cross-chunk mode (context parallelism's earlier chunks) the same way.
  chunk = lambda impl: lambda q, k, v: context_parallel.chunk_attention(
      q, k, v, causal=False, implementation=impl, interpret=INTERPRET)
  assert _kernels(chunk("pallas"), q, k, v) == {"stick_breaking_fwd_mosaic_gpu"}
  chex.assert_trees_all_equal(jax.jit(chunk("pallas"))(q, k, v),
                              jax.jit(chunk("pallas_mosaic_gpu"))(q, k, v))
  chunk_grads = lambda impl: jax.jit(jax.grad(
      lambda q, k, v: chunk(impl)(q, k, v)[0].astype(jnp.float32).sum(), argnums=(0, 1, 2)))
  assert _kernels(chunk_grads("pallas"), q, k, v) == {
      "stick_breaking_fwd", "stick_breaking_bwd_dq", "stick_breaking_bwd_dkv"}
  chex.assert_trees_all_equal(chunk_grads("pallas")(q, k, v), chunk_grads("pallas_triton")(q, k, v))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=jnp.float32), "supports bfloat16 and float16"),
    (dict(head_dim=80), "supports head dims"),
    (dict(block_sizes=sbjax.BlockSizes()), "takes a MosaicBlockSizes"),
], ids=["float32", "head_dim", "block_sizes"])
def test_rejects_what_it_does_not_take(kwargs, match):
  dtype, h = kwargs.pop("dtype", jnp.bfloat16), kwargs.pop("head_dim", 64)
  q, k, v, _ = random_inputs(0, Shape(1, 64, 1, 1, h), dtype)
  with pytest.raises((ValueError, TypeError), match=match):
    sbjax.stick_breaking_attention(q, k, v, implementation="pallas_mosaic_gpu", interpret=True,
                                   **kwargs)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the kernel runs compiled")
def test_needs_a_gpu_or_interpret():
  q, k, v, _ = random_inputs(0, Shape(1, 64, 1, 1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU or interpret=True"):
    sbjax.stick_breaking_attention(q, k, v, implementation="pallas_mosaic_gpu")


@pytest.mark.parametrize("kwargs", [dict(block_q=128), dict(block_k=96), dict(num_buffers=1),
                                    dict(num_buffers_bwd=1), dict(num_compute_warpgroups=3),
                                    dict(operands_in_registers=1), dict(pipeline_qk=1),
                                    dict(schedule_barrier=True), dict(accumulate_in_place=1),
                                    dict(heavy_first=1), dict(skip_used_stick=0),
                                    dict(block_k_dq=48), dict(block_k_dkv=128),
                                    dict(num_compute_warpgroups=2, consumer_registers=256)],
                         ids=str)
def test_config_validation(kwargs):
  with pytest.raises(ValueError, match="MosaicBlockSizes"):
    MosaicBlockSizes(**kwargs)
