"""Forward Pallas Triton kernel: one program per (query block, batch, head).

Each program walks key blocks from the diagonal leftwards (nearest first), carrying the row's
log2-stick (the sum of ``log2(1 - beta)`` over the keys already walked) and the output in fp32.
Only the diagonal blocks are masked, and the walk stops once every row's stick is used up
(``tiles.SKIP_LOG2``; exact in fp32) or below the op's ``skip_tolerance``. Inputs are read in
place: a partial last block and head dims that are not powers of two are masked in the kernel.
``causal=False`` is the fully visible cross-chunk mode of context parallelism: every key of an
earlier chunk is visible (only a partial last key block and segments are masked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sbjax.kernels import pallas_triton_tiles as tiles
from sbjax.kernels.pallas_triton_config import BlockSizes


def _fwd_kernel(scale_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, gate_ref, out_ref, rem_ref, *,
                seq_len, head_dim, head_dim_v, block_q, block_k, attend_current, causal,
                cumsum_parts, gpu, skip, blocks_per_check, stop):
  num_q_blocks, num_k_blocks = tiles.cdiv(seq_len, block_q), tiles.cdiv(seq_len, block_k)
  q_block = tiles.heaviest_first(pl.program_id(0), num_q_blocks)
  h_cols = tiles.in_range(0, q_ref.shape[-1], head_dim, partial=q_ref.shape[-1] != head_dim)
  hv_cols = tiles.in_range(0, v_ref.shape[-1], head_dim_v, partial=v_ref.shape[-1] != head_dim_v)
  q_pos = tiles.positions(q_block * block_q, block_q)
  q_rows = tiles.in_range(q_block * block_q, block_q, seq_len, partial=seq_len % block_q != 0)
  q = tiles.load(q_ref, rows=q_rows, cols=h_cols)  # [block_q, H]
  q_seg = None if q_seg_ref is None else tiles.load(
      q_seg_ref.at[pl.ds(q_block * block_q, block_q)], rows=q_rows)
  scale2 = scale_ref[0] * tiles.LOG2E
  precision = tiles.dot_precision(q.dtype)
  weights = functools.partial(
      tiles.stick_weights, nearer=tiles.triangle(block_k, lambda m, i: m > i), parts=cumsum_parts,
      fast=gpu, exact=q.dtype == jnp.float32)

  def tile(kb, carry, *, masked):
    acc, log_stick = carry  # [block_q, Hv], [block_q]
    keys = pl.ds(kb * block_k, block_k)
    k_rows = tiles.in_range(kb * block_k, block_k, seq_len, partial=seq_len % block_k != 0)
    k = tiles.load(k_ref.at[keys, :], rows=k_rows, cols=h_cols)  # [block_k, H]
    v = tiles.load(v_ref.at[keys, :], rows=k_rows, cols=hv_cols)  # [block_k, Hv]
    x = tiles.dot(q, k, trans_b=True, precision=precision) * scale2  # [block_q, block_k]
    mask = None
    if masked or q_seg_ref is not None:
      k_seg = None if k_seg_ref is None else tiles.load(k_seg_ref.at[keys], rows=k_rows)
      mask = tiles.visible(q_pos, tiles.positions(kb * block_k, block_k), q_seg, k_seg,
                           attend_current=attend_current, causal=causal,
                           k_valid=None if causal else k_rows)
    gate = None if gate_ref is None else tiles.key_gate(tiles.load(gate_ref.at[keys], rows=k_rows))
    w = weights(x, log_stick, mask=mask, gate=gate)
    acc += tiles.dot(w.a.astype(v.dtype), v, precision=precision)  # [block_q, Hv]
    return acc, log_stick + w.stick_sum

  n_full, n_total = tiles.key_blocks_seen(q_block, block_q=block_q, block_k=block_k,
                                          num_k_blocks=num_k_blocks, attend_current=attend_current,
                                          causal=causal, partial_k=seq_len % block_k != 0)
  # Rows past the sequence end read as used up, so that they never hold their block's walk.
  live = (lambda c: c[1]) if q_rows is None else (lambda c: jnp.where(q_rows, c[1], -jnp.inf))
  carry = (jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32), jnp.zeros((block_q,), jnp.float32))
  _, (acc, log_stick) = tiles.walk_right_to_left(
      tile, carry, live, n_full=n_full, n_total=n_total, skip=skip,
      blocks_per_check=blocks_per_check, stop=stop)
  tiles.store(out_ref, acc.astype(out_ref.dtype), rows=q_rows, cols=hv_cols)
  tiles.store(rem_ref, jnp.exp2(log_stick), rows=q_rows)


def forward(q, k, v, scale, segment_ids, forget_gate, *, attend_current: bool,
            block_sizes: BlockSizes, skip_tolerance: float, interpret: bool, causal: bool = True,
            key_segment_ids=None):
  """Launches the forward kernel.

  Args:
    q: ``[B, T, N, H]``; k: ``[B, T, K, H]``; v: ``[B, T, K, Hv]`` (any T, H, Hv <= 256).
    scale: ``[1]`` float32.
    segment_ids: ``[B, T]`` int32 or None (the queries' when ``causal=False``).
    forget_gate: ``[B, T, K]`` float32 logits or None.
    skip_tolerance: 0 (exact skipping) or the stick below which a row block stops
      (``tiles.stop_log2``).
    causal: False is the fully visible cross-chunk mode: the queries attend to every key of an
      earlier chunk (of the same length T), nearest (last) key first, with a fresh stick.
    key_segment_ids: ``[B, T]`` int32, the keys' segment ids when ``causal=False`` (given with
      ``segment_ids``); a causal call reads ``segment_ids`` for both sides.

  Returns:
    ``(out [B, T, N, Hv] in q.dtype, rem [B, N, T] float32)``.
  """
  b, t, n, h = q.shape
  num_kv_heads, hv = k.shape[2], v.shape[-1]
  group = n // num_kv_heads
  hp, hvp = tiles.padded_head_dim(h), tiles.padded_head_dim(hv)
  bq, bk = block_sizes.block_q, block_sizes.block_k
  nq = tiles.cdiv(t, bq)
  kernel = functools.partial(
      _fwd_kernel, seq_len=t, head_dim=h, head_dim_v=hv, block_q=bq, block_k=bk,
      attend_current=attend_current, causal=causal, cumsum_parts=tiles.cumsum_parts(q.dtype),
      gpu=not interpret,
      skip=block_sizes.skip_used_stick, blocks_per_check=block_sizes.num_blocks_per_check,
      stop=tiles.stop_log2(skip_tolerance))
  q_block = lambda i: tiles.heaviest_first(i, nq)
  kv_head = lambda ni: ni // group
  return pl.pallas_call(
      kernel,
      grid=(nq, b, n),
      in_specs=[
          pl.BlockSpec((1,), lambda i, bi, ni: (0,)),
          pl.BlockSpec((None, bq, None, hp), lambda i, bi, ni: (bi, q_block(i), ni, 0)),
          pl.BlockSpec((None, t, None, hp), lambda i, bi, ni: (bi, 0, kv_head(ni), 0)),
          pl.BlockSpec((None, t, None, hvp), lambda i, bi, ni: (bi, 0, kv_head(ni), 0)),
          None if segment_ids is None else pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0)),
          None if segment_ids is None else pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0)),
          None if forget_gate is None else pl.BlockSpec(
              (None, t, None), lambda i, bi, ni: (bi, 0, kv_head(ni))),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, hvp), lambda i, bi, ni: (bi, q_block(i), ni, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, q_block(i))),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, t, n, hv), q.dtype),
          jax.ShapeDtypeStruct((b, n, t), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="stick_breaking_fwd",
  )(scale, q, k, v, segment_ids, segment_ids if causal else key_segment_ids, forget_gate)
