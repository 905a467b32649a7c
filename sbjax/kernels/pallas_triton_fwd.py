"""Forward Pallas Triton kernel: one program per (query block, batch, head).

Each program walks key blocks from the diagonal leftwards (nearest first), carrying the row's
log2-stick (the sum of ``log2(1 - beta)`` over the keys already walked) and the output in fp32.
Only the diagonal blocks are masked, and the walk stops once every row's stick is used up
(``tiles.SKIP_LOG2``; exact in fp32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sbjax.kernels import pallas_triton_tiles as tiles
from sbjax.kernels.pallas_triton_config import BlockSizes


def _fwd_kernel(scale_ref, q_ref, k_ref, v_ref, *refs, block_q, block_k, num_q_blocks,
                attend_current, has_segments, cumsum_parts, gpu, skip):
  if has_segments:
    seg_ref, out_ref, rem_ref = refs
  else:
    (out_ref, rem_ref), seg_ref = refs, None
  q_block = num_q_blocks - 1 - pl.program_id(0)  # heaviest (last) query blocks start first
  q = q_ref[...]  # [block_q, H]
  scale2 = scale_ref[0] * tiles.LOG2E
  precision = tiles.dot_precision(q.dtype)
  exact = q.dtype == jnp.float32  # fp32-accurate softplus and log-sigmoid
  nearer_keys = tiles.triangle(block_k, lambda m, i: m > i)  # [block_k, block_k]
  q_pos = tiles.positions(q_block * block_q, block_q)
  q_seg = seg_ref[pl.ds(q_block * block_q, block_q)] if has_segments else None

  def tile(kb, carry, *, masked):
    acc, log_stick = carry  # [block_q, Hv], [block_q]
    keys = pl.ds(kb * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]  # [block_k, H], [block_k, Hv]
    x = tiles.dot(q, k, trans_b=True, precision=precision) * scale2  # [block_q, block_k]
    sp = tiles.softplus2(x, fast=gpu, exact=exact)
    mask = None
    if masked or has_segments:
      k_seg = seg_ref[keys] if has_segments else None
      mask = tiles.visible(q_pos, tiles.positions(kb * block_k, block_k), q_seg, k_seg,
                           attend_current=attend_current)
      log_1m_beta = jnp.where(mask, -sp, 0.0)
    else:
      log_1m_beta = -sp
    # log2 A = log2 beta + (log2(1 - beta) summed over nearer keys, in this block and to its right)
    nearer = tiles.masked_row_sums(log_1m_beta, nearer_keys, parts=cumsum_parts) + log_stick[:, None]
    a = jnp.exp2(tiles.log2_sigmoid(x, sp, exact=exact, fast=gpu) + nearer)
    if mask is not None:
      a = jnp.where(mask, a, 0.0)
    acc += tiles.dot(a.astype(v.dtype), v, precision=precision)
    return acc, log_stick + jnp.sum(log_1m_beta, axis=1)

  n_full, n_total = tiles.key_block_range(q_block, block_q=block_q, block_k=block_k,
                                          attend_current=attend_current)
  carry = (jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32), jnp.zeros((block_q,), jnp.float32))
  _, (acc, log_stick) = tiles.walk_right_to_left(
      tile, carry, lambda c: c[1], n_full=n_full, n_total=n_total, skip=skip)
  out_ref[...] = acc.astype(out_ref.dtype)
  rem_ref[...] = jnp.exp2(log_stick)


def forward(q, k, v, scale, segment_ids, *, attend_current: bool, block_sizes: BlockSizes,
            interpret: bool):
  """Launches the forward kernel on padded inputs.

  Args:
    q: ``[B, T, N, H]`` with T a multiple of every block size and H a power of two.
    k: ``[B, T, K, H]``; v: ``[B, T, K, Hv]``.
    scale: ``[1]`` float32.
    segment_ids: ``[B, T]`` int32 or None.

  Returns:
    ``(out [B, T, N, Hv] in q.dtype, rem [B, N, T] float32)``.
  """
  b, t, n, h = q.shape
  kv_heads, hv = k.shape[2], v.shape[-1]
  group = n // kv_heads
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq = t // bq
  kernel = functools.partial(
      _fwd_kernel, block_q=bq, block_k=bk, num_q_blocks=nq, attend_current=attend_current,
      has_segments=segment_ids is not None, cumsum_parts=tiles.cumsum_parts(q.dtype),
      gpu=not interpret, skip=block_sizes.skip_used_stick)
  rev = lambda i: nq - 1 - i
  in_specs = [
      pl.BlockSpec((1,), lambda i, bi, ni: (0,)),
      pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, rev(i), ni, 0)),
      pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni // group, 0)),
      pl.BlockSpec((None, t, None, hv), lambda i, bi, ni: (bi, 0, ni // group, 0)),
  ]
  args = [scale, q, k, v]
  if segment_ids is not None:
    in_specs.append(pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0)))
    args.append(segment_ids)
  return pl.pallas_call(
      kernel,
      grid=(nq, b, n),
      in_specs=in_specs,
      out_specs=[
          pl.BlockSpec((None, bq, None, hv), lambda i, bi, ni: (bi, rev(i), ni, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, rev(i))),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, t, n, hv), q.dtype),
          jax.ShapeDtypeStruct((b, n, t), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="stick_breaking_fwd",
  )(*args)
