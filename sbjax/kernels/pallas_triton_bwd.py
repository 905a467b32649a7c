"""Backward Pallas Triton kernels: dq (with the per-row boundary sums), then dk/dv.

With ``g_ji = A_ji (do_j . v_i - drem_j)`` (DESIGN.md §1), the logit gradient needs the inclusive
prefix of ``g`` from the left:

    dz_jm = g_jm - sigmoid(z_jm) * sum_{i <= m} g_ji

so the dq kernel walks each row block's keys left to right, carrying that prefix and the prefix
of ``log2(1 - beta)``; ``log2 A`` then follows from the forward's saved row total ``log2 rem``.
(Taking the prefix of ``g`` as a row total minus a suffix, as softmax kernels do with
``delta = do . o``, would multiply the rounding of ``o`` by ``sum_m sigmoid(z_jm)``, which grows
with T.) The dq kernel records both prefixes at every key-block boundary (``lpre``, ``gpre``: fp32
``[B, N, T / block_k_bwd, T]``) and the dk/dv kernel, one program per key block and kv head, starts
from them instead of re-walking the keys to its left. No atomics: each output element is written
by one program, so gradients are bitwise deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sbjax.kernels import pallas_triton_tiles as tiles
from sbjax.kernels.pallas_triton_config import BlockSizes
from sbjax.kernels.pallas_triton_fwd import key_block_range


def _logit_grads(q, k, v, do, drem, scale2, log_stick, g_prefix, mask, *, lower, parts,
                 fast_math):
  """One ``[Q, S]`` tile: weights ``A`` and logit gradients ``dz`` (fp32), and the row sums.

  ``log_stick [Q]`` is ``log2 rem`` minus the sum of ``log2(1 - beta)`` over keys left of the
  tile, ``g_prefix [Q]`` the sum of ``g`` over those keys.
  """
  precision = tiles.dot_precision(q.dtype)
  x = tiles.dot(q, k, trans_b=True, precision=precision) * scale2  # [Q, S] base-2 logits
  sp = tiles.softplus2(x, fast=fast_math)
  log_1m_beta = -sp if mask is None else jnp.where(mask, -sp, 0.0)
  # Sum over keys nearer than m (right of it) = row total - keys left of the tile - (m' <= m).
  log_a = x - sp + log_stick[:, None] - tiles.masked_row_sums(log_1m_beta, lower, parts=parts)
  a = jnp.exp2(log_a)
  if mask is not None:
    a = jnp.where(mask, a, 0.0)
  dp = tiles.dot(do, v, trans_b=True, precision=precision)  # [Q, S]
  g = a * (dp - drem[:, None])
  prefix = g_prefix[:, None] + tiles.masked_row_sums(g, lower, parts=parts)  # sum_{i <= m} g
  dz = g - jnp.exp2(x - sp) * prefix  # exp2(x - sp) = sigmoid(z)
  if mask is not None:
    dz = jnp.where(mask, dz, 0.0)
  return a, dz, jnp.sum(log_1m_beta, axis=1), jnp.sum(g, axis=1)


def _dq_kernel(scale_ref, q_ref, k_ref, v_ref, do_ref, drem_ref, lrem_ref, *refs, block_q,
               block_k, num_q_blocks, attend_current, has_segments, cumsum_parts, fast_math):
  if has_segments:
    seg_ref, dq_ref, lpre_ref, gpre_ref = refs
  else:
    (dq_ref, lpre_ref, gpre_ref), seg_ref = refs, None
  q_block = num_q_blocks - 1 - pl.program_id(0)
  q, do, drem = q_ref[...], do_ref[...], drem_ref[...]  # [block_q, H], [block_q, Hv], [block_q]
  scale2 = scale_ref[0] * tiles.LOG2E
  precision = tiles.dot_precision(q.dtype)
  lower = tiles.inclusive_lower(block_k)
  q_pos = q_block * block_q + jnp.arange(block_q)
  q_seg = seg_ref[pl.ds(q_block * block_q, block_q)] if has_segments else None

  def tile(kb, carry, *, masked):
    dq, log_stick, g_prefix = carry
    lpre_ref[kb, :] = log_stick  # the dk/dv kernel starts key block kb from these sums
    gpre_ref[kb, :] = g_prefix
    keys = pl.ds(kb * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]  # [block_k, H], [block_k, Hv]
    mask = None
    if masked or has_segments:
      mask = tiles.visible(q_pos, kb * block_k + jnp.arange(block_k), q_seg,
                           seg_ref[keys] if has_segments else None, attend_current=attend_current)
    _, dz, l_sum, g_sum = _logit_grads(q, k, v, do, drem, scale2, log_stick, g_prefix, mask,
                                       lower=lower, parts=cumsum_parts, fast_math=fast_math)
    dq += tiles.dot(dz.astype(k.dtype), k, precision=precision)  # [block_q, H]
    return dq, log_stick - l_sum, g_prefix + g_sum

  n_full, n_total = key_block_range(q_block, block_q=block_q, block_k=block_k,
                                    attend_current=attend_current)
  # Left to right: first the fully visible blocks, then the masked diagonal ones.
  carry = (jnp.zeros(q.shape, jnp.float32), lrem_ref[...], jnp.zeros((block_q,), jnp.float32))
  carry = jax.lax.fori_loop(0, n_full, functools.partial(tile, masked=False), carry)
  dq, _, _ = jax.lax.fori_loop(n_full, n_total, functools.partial(tile, masked=True), carry)
  dq_ref[...] = dq  # unscaled: dq = scale * dq_raw, dscale = sum(q * dq_raw)


def _dkv_kernel(scale_ref, q_ref, k_ref, v_ref, do_ref, drem_ref, lpre_ref, gpre_ref, *refs,
                block_q, block_k, num_q_blocks, group, attend_current, has_segments, cumsum_parts,
                fast_math):
  if has_segments:
    seg_ref, dk_ref, dv_ref = refs
  else:
    (dk_ref, dv_ref), seg_ref = refs, None
  kb = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]  # [block_k, H], [block_k, Hv]
  scale = scale_ref[0]
  precision = tiles.dot_precision(k.dtype)
  lower = tiles.inclusive_lower(block_k)
  k_pos = kb * block_k + jnp.arange(block_k)
  k_seg = seg_ref[pl.ds(kb * block_k, block_k)] if has_segments else None

  def tile(j, carry, *, g, masked):
    dk, dv = carry
    rows = pl.ds(j * block_q, block_q)
    q, do = q_ref[rows, g, :], do_ref[rows, g, :]  # [block_q, H], [block_q, Hv]
    mask = None
    if masked or has_segments:
      mask = tiles.visible(j * block_q + jnp.arange(block_q), k_pos,
                           seg_ref[rows] if has_segments else None, k_seg,
                           attend_current=attend_current)
    a, dz, _, _ = _logit_grads(
        q, k, v, do, drem_ref[g, rows], scale * tiles.LOG2E, lpre_ref[g, rows], gpre_ref[g, rows],
        mask, lower=lower, parts=cumsum_parts, fast_math=fast_math)
    dv += tiles.dot(a.astype(do.dtype), do, trans_a=True, precision=precision)  # [block_k, Hv]
    dk += tiles.dot(dz.astype(q.dtype), q, trans_a=True, precision=precision)  # [block_k, H]
    return dk, dv

  # Query blocks with a row that sees a key of this block: [j_first, num_q_blocks); rows of
  # [j_first, j_full) may miss some of its keys (masked), later rows see them all.
  j_first = jax.lax.div(kb * block_k + 1 - int(attend_current), block_q)
  j_full = jnp.minimum(
      jax.lax.div((kb + 1) * block_k - int(attend_current) + block_q - 1, block_q), num_q_blocks)

  def head(g, carry):
    carry = jax.lax.fori_loop(j_first, j_full, functools.partial(tile, g=g, masked=True), carry)
    return jax.lax.fori_loop(j_full, num_q_blocks, functools.partial(tile, g=g, masked=False),
                             carry)

  dk, dv = jax.lax.fori_loop(
      0, group, head, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, scale, segment_ids, lrem, d_out, d_rem, *, attend_current: bool,
             block_sizes: BlockSizes, interpret: bool):
  """Gradients of ``pallas_triton_fwd.forward`` on padded inputs.

  Args:
    q, k, v, scale, segment_ids: as for ``pallas_triton_fwd.forward``.
    lrem: ``[B, N, T]`` float32 ``log2(rem)`` saved by the forward kernel.
    d_out: ``[B, T, N, Hv]``; d_rem: ``[B, N, T]`` cotangents.

  Returns:
    ``(dq, dk, dv, dscale)`` in the dtypes of ``(q, k, v, scale)``.
  """
  b, t, n, h = q.shape
  kv_heads, hv = k.shape[2], v.shape[-1]
  group = n // kv_heads
  bq, bk, bq_kv = block_sizes.block_q_dq, block_sizes.block_k_bwd, block_sizes.block_q_dkv
  nkb = t // bk
  d_rem = d_rem.astype(jnp.float32)
  common = dict(attend_current=attend_current, has_segments=segment_ids is not None,
                cumsum_parts=tiles.cumsum_parts(q.dtype), fast_math=not interpret)
  params = plgpu.CompilerParams(num_warps=block_sizes.num_warps_bwd,
                                num_stages=block_sizes.num_stages_bwd)
  seg_args = [] if segment_ids is None else [segment_ids]

  nq = t // bq
  rev = lambda i: nq - 1 - i  # heaviest (last) query blocks start first
  row_vec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, rev(i)))
  boundary = pl.BlockSpec((None, None, nkb, bq), lambda i, bi, ni: (bi, ni, 0, rev(i)))
  dq_raw, lpre, gpre = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_k=bk, num_q_blocks=nq, **common),
      grid=(nq, b, n),
      in_specs=[
          pl.BlockSpec((1,), lambda i, bi, ni: (0,)),
          pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, rev(i), ni, 0)),
          pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni // group, 0)),
          pl.BlockSpec((None, t, None, hv), lambda i, bi, ni: (bi, 0, ni // group, 0)),
          pl.BlockSpec((None, bq, None, hv), lambda i, bi, ni: (bi, rev(i), ni, 0)),
          row_vec,
          row_vec,
      ] + [pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0))] * len(seg_args),
      out_specs=[
          pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, rev(i), ni, 0)),
          boundary,
          boundary,
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
          jax.ShapeDtypeStruct((b, n, nkb, t), jnp.float32),
          jax.ShapeDtypeStruct((b, n, nkb, t), jnp.float32),
      ],
      compiler_params=params,
      interpret=interpret,
      name="stick_breaking_bwd_dq",
  )(scale, q, k, v, d_out, d_rem, lrem, *seg_args)

  group_rows = pl.BlockSpec((None, group, t), lambda kb, bi, ki: (bi, ki, 0))
  group_boundary = pl.BlockSpec((None, group, None, t), lambda kb, bi, ki: (bi, ki, kb, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq_kv, block_k=bk, num_q_blocks=t // bq_kv,
                        group=group, **common),
      grid=(nkb, b, kv_heads),
      in_specs=[
          pl.BlockSpec((1,), lambda kb, bi, ki: (0,)),
          pl.BlockSpec((None, t, group, h), lambda kb, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, bk, None, h), lambda kb, bi, ki: (bi, kb, ki, 0)),
          pl.BlockSpec((None, bk, None, hv), lambda kb, bi, ki: (bi, kb, ki, 0)),
          pl.BlockSpec((None, t, group, hv), lambda kb, bi, ki: (bi, 0, ki, 0)),
          group_rows,
          group_boundary,
          group_boundary,
      ] + [pl.BlockSpec((None, t), lambda kb, bi, ki: (bi, 0))] * len(seg_args),
      out_specs=[
          pl.BlockSpec((None, bk, None, h), lambda kb, bi, ki: (bi, kb, ki, 0)),
          pl.BlockSpec((None, bk, None, hv), lambda kb, bi, ki: (bi, kb, ki, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="stick_breaking_bwd_dkv",
  )(scale, q, k, v, d_out, d_rem, lpre, gpre, *seg_args)

  dq = (dq_raw * scale[0]).astype(q.dtype)
  dscale = jnp.sum(q.astype(jnp.float32) * dq_raw).reshape(scale.shape).astype(scale.dtype)
  return dq, dk, dv, dscale
