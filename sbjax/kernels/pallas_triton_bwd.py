"""Backward Pallas Triton kernels: dq (with per-row boundary sums), then dk/dv.

With ``g_ji = A_ji (do_j . v_i - drem_j)`` (DESIGN.md §1) the logit gradient is

    dz_jm = g_jm - sigmoid(z_jm) * sum_{i <= m} g_ji        (a prefix from the LEFT)

while ``A`` needs suffix sums of ``log2(1 - beta)`` from the RIGHT. Keys are walked right to left,
as in the forward pass, so ``A`` is built exactly whatever the size of the logits. The dq kernel
walks each row block twice: first for the row sums of ``g`` over each key block, which it turns
into exact left prefixes (no "total minus suffix" cancellation: softmax kernels' ``delta = do . o``
analogue would multiply the bf16 rounding of ``o`` by ``sum_m sigmoid(z_jm)``, which grows with T);
then for ``dz``, ``dq`` and ``dscale``. It leaves each row's ``log2``-stick and ``g`` prefix at every
key-block boundary (fp32 ``[B, N, T / block_k_bwd, T]`` each) for the dk/dv kernel, one program
per key block and kv head, which starts from them instead of re-walking the row. Blocks that no
row's stick reaches are skipped (exact in fp32). No atomics: each output element is written by one
program, so gradients are bitwise deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sbjax.kernels import pallas_triton_tiles as tiles
from sbjax.kernels.pallas_triton_config import BlockSizes

_NO_STICK = -1e30  # log2-stick recorded for the key blocks a row's walk never reached
# In-block prefixes of g always get fp32 accuracy (3 bf16 parts), whatever the input dtype: g spans
# many magnitudes, and dscale weighs its errors by q . k (2 parts failed the saturated-logit test).
_G_PARTS = 3


def _triangles(block_k):
  """In-block sums over the nearer keys (m > i), the farther ones (m < i), and those with m <= i."""
  return (tiles.triangle(block_k, lambda m, i: m > i), tiles.triangle(block_k, lambda m, i: m < i),
          tiles.triangle(block_k, lambda m, i: m <= i))


def _tile_grads(q, k, v, do, drem, scale2, log_stick, g_prefix, mask, *, triangles, parts, gpu):
  """One ``[Q, S]`` tile of the backward pass (inputs in their dtype, results in fp32).

  Args:
    log_stick: ``[Q]`` sum of ``log2(1 - beta)`` over the keys right of the tile.
    g_prefix: ``[Q]`` sum of ``g`` over the keys left of the tile (None: skip ``dz``).
    parts: bf16 parts of the in-block sums of ``log2(1 - beta)`` (see ``tiles.masked_row_sums``).

  Returns:
    ``(q . k, A, g, dz or None, row sums of log2(1 - beta))``.
  """
  nearer, farther, not_nearer = triangles
  precision = tiles.dot_precision(q.dtype)
  exact = q.dtype == jnp.float32
  qk = tiles.dot(q, k, trans_b=True, precision=precision)  # [Q, S]
  x = qk * scale2  # base-2 logits
  sp = tiles.softplus2(x, fast=gpu, exact=exact)
  log_1m_beta = -sp if mask is None else jnp.where(mask, -sp, 0.0)
  log_beta = tiles.log2_sigmoid(x, sp, exact=exact, fast=gpu)
  a = jnp.exp2(log_beta + tiles.masked_row_sums(log_1m_beta, nearer, parts=parts)
               + log_stick[:, None])
  if mask is not None:
    a = jnp.where(mask, a, 0.0)
  g = a * (tiles.dot(do, v, trans_b=True, precision=precision) - drem[:, None])  # [Q, S]
  dz = None
  if g_prefix is not None:
    if exact:  # where sigmoid ~ 1, g - sigmoid * g cancels: use g (1 - sigmoid) instead
      dz = g * jnp.exp2(-sp) - jnp.exp2(log_beta) * (
          g_prefix[:, None] + tiles.masked_row_sums(g, farther, parts=_G_PARTS))
    else:
      dz = g - jnp.exp2(log_beta) * (
          g_prefix[:, None] + tiles.masked_row_sums(g, not_nearer, parts=_G_PARTS))
    if mask is not None:
      dz = jnp.where(mask, dz, 0.0)
  return qk, a, g, dz, jnp.sum(log_1m_beta, axis=1)


def _dq_kernel(scale_ref, q_ref, k_ref, v_ref, do_ref, drem_ref, *refs, block_q, block_k,
               num_q_blocks, attend_current, has_segments, cumsum_parts, gpu, skip):
  if has_segments:
    seg_ref, dq_ref, dscale_ref, first_ref, lsuf_ref, gpre_ref = refs
  else:
    (dq_ref, dscale_ref, first_ref, lsuf_ref, gpre_ref), seg_ref = refs, None
  q_block = num_q_blocks - 1 - pl.program_id(0)
  q, do, drem = q_ref[...], do_ref[...], drem_ref[...]  # [block_q, H], [block_q, Hv], [block_q]
  scale = scale_ref[0]
  precision = tiles.dot_precision(q.dtype)
  q_pos = tiles.positions(q_block * block_q, block_q)
  q_seg = seg_ref[pl.ds(q_block * block_q, block_q)] if has_segments else None
  n_full, n_total = tiles.key_block_range(q_block, block_q=block_q, block_k=block_k,
                                          attend_current=attend_current)
  walk = functools.partial(tiles.walk_right_to_left, n_full=n_full, n_total=n_total, skip=skip)
  grads = functools.partial(_tile_grads, scale2=scale * tiles.LOG2E, triangles=_triangles(block_k),
                            parts=cumsum_parts, gpu=gpu)

  def load(kb, masked):
    keys = pl.ds(kb * block_k, block_k)
    mask = None
    if masked or has_segments:
      mask = tiles.visible(q_pos, tiles.positions(kb * block_k, block_k), q_seg,
                           seg_ref[keys] if has_segments else None, attend_current=attend_current)
    return k_ref[keys, :], v_ref[keys, :], mask  # [block_k, H], [block_k, Hv], [Q, S]

  def sum_tile(kb, log_stick, *, masked):  # first walk: row sums of g per key block
    k, v, mask = load(kb, masked)
    _, _, g, _, l_sum = grads(q, k, v, do, drem, log_stick=log_stick, g_prefix=None, mask=mask)
    gpre_ref[kb, :] = jnp.sum(g, axis=1)
    return log_stick + l_sum

  zeros = jnp.zeros((block_q,), jnp.float32)
  first, _ = walk(sum_tile, zeros, lambda c: c)
  if gpu:
    plgpu.debug_barrier()  # the block sums were stored by other threads than may read them

  def to_prefix(kb, running):  # block sums -> exclusive prefixes from the left
    block_sum = jnp.where(kb >= first, gpre_ref[kb, :], 0.0)  # unwalked blocks hold g = 0
    if gpu:
      plgpu.debug_barrier()  # every thread has read the sums before any overwrites them
    gpre_ref[kb, :] = running
    lsuf_ref[kb, :] = jnp.full((block_q,), _NO_STICK, jnp.float32)  # overwritten where walked
    return running + block_sum

  jax.lax.fori_loop(0, n_total, to_prefix, zeros)
  if gpu:
    plgpu.debug_barrier()

  def dq_tile(kb, carry, *, masked):  # second walk: dz, dq, dscale and the stick at boundaries
    dq, dscale, log_stick = carry
    lsuf_ref[kb, :] = log_stick
    k, v, mask = load(kb, masked)
    qk, _, _, dz, l_sum = grads(q, k, v, do, drem, log_stick=log_stick, g_prefix=gpre_ref[kb, :],
                                mask=mask)
    dq += tiles.dot(dz.astype(k.dtype), k, precision=precision)  # [block_q, H]
    # dL/dscale = sum dz * (q . k), from the fp32 logits as autodiff of the reference would.
    return dq, dscale + jnp.sum(dz * qk, axis=1), log_stick + l_sum

  first, (dq, dscale, _) = walk(dq_tile, (jnp.zeros(q.shape, jnp.float32), zeros, zeros),
                                lambda c: c[2])
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
  dscale_ref[...] = dscale
  first_ref[...] = jnp.full((block_q,), first, jnp.int32)


def _dkv_kernel(scale_ref, row_end_ref, q_ref, k_ref, v_ref, do_ref, drem_ref, lsuf_ref, gpre_ref,
                *refs,
                block_q, block_k, num_q_blocks, group, attend_current, has_segments, cumsum_parts,
                gpu, skip):
  if has_segments:
    seg_ref, dk_ref, dv_ref = refs
  else:
    (dk_ref, dv_ref), seg_ref = refs, None
  kb = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]  # [block_k, H], [block_k, Hv]
  scale = scale_ref[0]
  precision = tiles.dot_precision(k.dtype)
  grads = functools.partial(_tile_grads, scale2=scale * tiles.LOG2E, triangles=_triangles(block_k),
                            parts=cumsum_parts, gpu=gpu)
  k_pos = tiles.positions(kb * block_k, block_k)
  k_seg = seg_ref[pl.ds(kb * block_k, block_k)] if has_segments else None

  def tile(j, carry, *, g, masked):
    rows = pl.ds(j * block_q, block_q)
    log_stick = lsuf_ref[g, rows]  # [block_q]

    def compute(carry):
      dk, dv = carry
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]  # [block_q, H], [block_q, Hv]
      mask = None
      if masked or has_segments:
        mask = tiles.visible(tiles.positions(j * block_q, block_q), k_pos,
                             seg_ref[rows] if has_segments else None, k_seg,
                             attend_current=attend_current)
      _, a, _, dz, _ = grads(q, k, v, do, drem_ref[g, rows], log_stick=log_stick,
                             g_prefix=gpre_ref[g, rows], mask=mask)
      dv += tiles.dot(a.astype(do.dtype), do, trans_a=True, precision=precision)  # [block_k, Hv]
      dk += tiles.dot(dz.astype(q.dtype), q, trans_a=True, precision=precision)  # [block_k, H]
      return dk, dv

    if not skip:
      return compute(carry)
    # No row's stick reaches this key block: its weights and gradients are exactly 0. Rows that
    # see no key here were never written (NaN in interpret mode, arbitrary on a GPU); every tile
    # also holds a written row, and the mask selects the unwritten ones away where computed.
    return jax.lax.cond(jnp.max(log_stick) < tiles.SKIP_LOG2, lambda c: c, compute, carry)

  # Query blocks with a row that sees a key of this block and whose walk reached it:
  # [j_first, j_end); rows of [j_first, j_full) may miss some of its keys (masked).
  j_first = tiles.div(kb * block_k + 1 - int(attend_current), block_q)
  j_end = tiles.div(row_end_ref[0] + block_q - 1, block_q)
  j_full = tiles.div((kb + 1) * block_k - int(attend_current) + block_q - 1, block_q)

  def head(g, carry):
    carry = jax.lax.fori_loop(j_first, jnp.minimum(j_full, j_end),
                              functools.partial(tile, g=g, masked=True), carry)
    return jax.lax.fori_loop(j_full, j_end, functools.partial(tile, g=g, masked=False), carry)

  dk, dv = jax.lax.fori_loop(
      0, group, head, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _live_row_end(first, block_q, num_key_blocks, kv_heads):
  """``[B, K, num_key_blocks]``: rows past this never reach the key block (their stick is used up).

  ``first [B, N, num_row_blocks]`` is the leftmost key block each dq row block walked. Row blocks
  that reach key block ``kb`` all lie before the first point from which every later row block
  stopped right of ``kb``: where the suffix minimum of ``first`` exceeds ``kb``.
  """
  suffix_min = jax.lax.cummin(first, axis=2, reverse=True)  # non-decreasing along row blocks
  reach = jnp.sum(suffix_min[..., None] <= jnp.arange(num_key_blocks), axis=2)  # [B, N, nkb]
  b, n, _ = first.shape
  reach = reach.reshape(b, kv_heads, n // kv_heads, num_key_blocks).max(axis=2)
  return (reach * block_q).astype(jnp.int32)


def backward(q, k, v, scale, segment_ids, d_out, d_rem, *, attend_current: bool,
             block_sizes: BlockSizes, interpret: bool):
  """Gradients of ``pallas_triton_fwd.forward`` on padded inputs.

  Args:
    q, k, v, scale, segment_ids: as for ``pallas_triton_fwd.forward``.
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
                cumsum_parts=tiles.cumsum_parts(q.dtype), gpu=not interpret,
                skip=block_sizes.skip_used_stick)
  params = plgpu.CompilerParams(num_warps=block_sizes.num_warps_bwd,
                                num_stages=block_sizes.num_stages_bwd)
  seg_args = [] if segment_ids is None else [segment_ids]

  nq = t // bq
  rev = lambda i: nq - 1 - i  # heaviest (last) query blocks start first
  row_vec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, rev(i)))
  boundary = pl.BlockSpec((None, None, nkb, bq), lambda i, bi, ni: (bi, ni, 0, rev(i)))
  dq, dscale, first, lsuf, gpre = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_k=bk, num_q_blocks=nq, **common),
      grid=(nq, b, n),
      in_specs=[
          pl.BlockSpec((1,), lambda i, bi, ni: (0,)),
          pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, rev(i), ni, 0)),
          pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni // group, 0)),
          pl.BlockSpec((None, t, None, hv), lambda i, bi, ni: (bi, 0, ni // group, 0)),
          pl.BlockSpec((None, bq, None, hv), lambda i, bi, ni: (bi, rev(i), ni, 0)),
          row_vec,
      ] + [pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0))] * len(seg_args),
      out_specs=[
          pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, rev(i), ni, 0)),
          row_vec,
          row_vec,
          boundary,
          boundary,
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, t, n, h), q.dtype),
          jax.ShapeDtypeStruct((b, n, t), jnp.float32),
          jax.ShapeDtypeStruct((b, n, t), jnp.int32),
          jax.ShapeDtypeStruct((b, n, nkb, t), jnp.float32),
          jax.ShapeDtypeStruct((b, n, nkb, t), jnp.float32),
      ],
      compiler_params=params,
      interpret=interpret,
      name="stick_breaking_bwd_dq",
  )(scale, q, k, v, d_out, d_rem, *seg_args)

  row_end = _live_row_end(first[:, :, ::bq], bq, nkb, kv_heads)
  group_rows = pl.BlockSpec((None, group, t), lambda kb, bi, ki: (bi, ki, 0))
  group_boundary = pl.BlockSpec((None, group, None, t), lambda kb, bi, ki: (bi, ki, kb, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq_kv, block_k=bk, num_q_blocks=t // bq_kv,
                        group=group, **common),
      grid=(nkb, b, kv_heads),
      in_specs=[
          pl.BlockSpec((1,), lambda kb, bi, ki: (0,)),
          pl.BlockSpec((None, None, 1), lambda kb, bi, ki: (bi, ki, kb)),
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
  )(scale, row_end, q, k, v, d_out, d_rem, lsuf, gpre, *seg_args)
  return dq, dk, dv, jnp.sum(dscale).reshape(scale.shape)
