"""Backward Pallas Triton kernels: dq (with per-row boundary sums), then dk/dv (and the gate's).

With ``G_ji = dL/dlog A_ji = A_ji (do_j . v_i - drem_j)`` (docs/design.md §1, Gradient) and
``P_ji = sum_{m < i} G_jm`` (a prefix from the LEFT), the logit and gate gradients are

    ungated:  dz_ji = G_ji (1 - s_ji) - s_ji P_ji                      (s = sigmoid(z))
    gated:    dz_ji = (1 - s_ji) (G_ji - P_ji beta_ji / (1 - beta_ji))   (beta = f_i s_ji)
              dg_i  = sum_j (1 - f_i) (G_ji - P_ji beta_ji / (1 - beta_ji))

while ``A`` needs suffix sums of ``log2(1 - beta)`` from the RIGHT. Keys are walked right to left,
as in the forward pass, so ``A`` is built exactly whatever the size of the logits. Two walks in all
(the forward's is a third): the dq kernel walks each row block once. ``P`` of a key splits into an
in-block part and ``P_start`` of its block (the farther blocks' ``G``, not walked yet), and
``dz = dz_local - c P_start``; the ``P_start`` terms of ``dq`` and ``dscale`` are accumulated as the
walk meets each block's row sum of ``G``, weighted by what the nearer blocks gave (``sum c k``,
``sum c q.k``). Everything stays a sum of products in walk order: no "total minus suffix"
cancellation (softmax kernels' ``delta = do . o`` analogue would multiply the bf16 rounding of
``o`` by ``sum_m sigmoid(z_jm)``, which grows with T). The kernel leaves each row's ``log2``-stick
and exact ``G`` prefix at every key-block boundary (fp32 ``[B, N, T / block_k_bwd, T]`` each) for
the dk/dv kernel, one program per key block and kv head, which starts from them instead of
re-walking the row. The dq walk stops where the forward's does (a used-up stick, or
``skip_tolerance``), and the dk/dv kernel visits only the row blocks whose walk reached its key
block (exact in fp32 for exact skipping). No atomics: each output element is written by one
program, so gradients are bitwise deterministic.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sbjax.common import live_row_end
from sbjax.kernels import pallas_triton_tiles as tiles
from sbjax.kernels.pallas_triton_config import BlockSizes

_NO_STICK = -1e30  # log2-stick recorded for the key blocks a row's walk never reached
# In-block prefixes of G always get fp32 accuracy (3 bf16 parts), whatever the input dtype: G spans
# many magnitudes, and dscale weighs its errors by q . k (2 parts failed the saturated-logit test).
_G_PARTS = 3


class _Triangles(NamedTuple):
  """In-block sums over the nearer keys (m > i), the farther ones (m < i), and m <= i."""
  nearer: jax.Array
  farther: jax.Array
  not_nearer: jax.Array

  @classmethod
  def make(cls, block_k):
    return cls(tiles.triangle(block_k, lambda m, i: m > i),
               tiles.triangle(block_k, lambda m, i: m < i),
               tiles.triangle(block_k, lambda m, i: m <= i))


class _TileGrads(NamedTuple):
  """One ``[Q, S]`` tile of the backward pass (fp32)."""
  qk: jax.Array  # q . k, unscaled (dscale = sum dz * qk, as autodiff of the reference computes it)
  a: jax.Array  # weights A
  d_log_a: jax.Array  # G = dL/dlog A
  stick_sum: jax.Array  # [Q] row sums of log2(1 - beta)


def _tile(q, k, v, do, drem, log_stick, *, scale2, mask, gate, triangles, parts, gpu):
  """Weights and ``G`` of a tile; ``log_stick [Q]``: the log2-stick right of the tile."""
  precision = tiles.dot_precision(q.dtype)
  qk = tiles.dot(q, k, trans_b=True, precision=precision)  # [Q, S]
  w = tiles.stick_weights(qk * scale2, log_stick, mask=mask, gate=gate, nearer=triangles.nearer,
                          parts=parts, fast=gpu, exact=q.dtype == jnp.float32)
  d_log_a = w.a * (tiles.dot(do, v, trans_b=True, precision=precision) - drem[:, None])  # [Q, S]
  return w, _TileGrads(qk, w.a, d_log_a, w.stick_sum)


def _logit_grads(w: tiles.StickTile, d_log_a, prefix, *, mask, gate, triangles, exact):
  """``(dz [Q, S], dg [Q, S] or None)`` from ``G`` and ``prefix [Q]``, the sum of ``G`` over the
  keys left of the tile (``P`` of the tile's first key)."""
  if gate is None and not exact:
    # bf16/fp16: dz = G - s (P + G), one product fewer; its cancellation where s ~ 1 is below
    # the inputs' resolution.
    dz = d_log_a - jnp.exp2(w.log_s) * (
        prefix[:, None] + tiles.masked_row_sums(d_log_a, triangles.not_nearer, parts=_G_PARTS))
    dg = None
  else:
    p = prefix[:, None] + tiles.masked_row_sums(d_log_a, triangles.farther, parts=_G_PARTS)
    if gate is None:  # where s ~ 1, G - s G cancels: G (1 - s) keeps fp32 accuracy
      dz = jnp.exp2(w.log_1m_s) * d_log_a - jnp.exp2(w.log_s) * p
      dg = None
    else:
      log_odds = w.log_beta - w.log_1m_beta  # log2(beta / (1 - beta)); the exponents below are <= 0
      log_1mf = gate.log_1mf[None, :]
      dz = jnp.exp2(w.log_1m_s) * d_log_a - jnp.exp2(log_odds + w.log_1m_s) * p
      dg = jnp.exp2(log_1mf) * d_log_a - jnp.exp2(log_odds + log_1mf) * p
  if mask is not None:
    dz = jnp.where(mask, dz, 0.0)
    dg = None if dg is None else jnp.where(mask, dg, 0.0)
  return dz, dg


def _prefix_coefficient(w: tiles.StickTile, *, mask, gate):
  """``c [Q, S]`` with ``dz = (dz at a zero left prefix) - c P`` (see ``_logit_grads``):
  ``sigmoid(z)``, or ``beta / (1 - beta) (1 - sigmoid(z))`` with a gate; 0 where invisible."""
  c = jnp.exp2(w.log_s if gate is None else w.log_beta - w.log_1m_beta + w.log_1m_s)
  return c if mask is None else jnp.where(mask, c, 0.0)


def _dq_kernel(scale_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, gate_ref, do_ref, drem_ref,
               dq_ref, dscale_ref, first_ref, stick_ref, prefix_ref, *,
               seq_len, head_dim, head_dim_v, block_q, block_k, attend_current, causal,
               cumsum_parts, gpu, skip, blocks_per_check, stop):
  num_q_blocks, num_k_blocks = tiles.cdiv(seq_len, block_q), tiles.cdiv(seq_len, block_k)
  q_block = tiles.heaviest_first(pl.program_id(0), num_q_blocks)
  h_cols = tiles.in_range(0, q_ref.shape[-1], head_dim, partial=q_ref.shape[-1] != head_dim)
  hv_cols = tiles.in_range(0, v_ref.shape[-1], head_dim_v, partial=v_ref.shape[-1] != head_dim_v)
  q_rows = tiles.in_range(q_block * block_q, block_q, seq_len, partial=seq_len % block_q != 0)
  q = tiles.load(q_ref, rows=q_rows, cols=h_cols)  # [block_q, H]
  do = tiles.load(do_ref, rows=q_rows, cols=hv_cols)  # [block_q, Hv]
  drem = tiles.load(drem_ref, rows=q_rows)  # [block_q]
  q_pos = tiles.positions(q_block * block_q, block_q)
  q_seg = None if q_seg_ref is None else tiles.load(
      q_seg_ref.at[pl.ds(q_block * block_q, block_q)], rows=q_rows)
  scale = scale_ref[0]
  precision = tiles.dot_precision(q.dtype)
  triangles = _Triangles.make(block_k)
  n_full, n_total = tiles.key_blocks_seen(q_block, block_q=block_q, block_k=block_k,
                                          num_k_blocks=num_k_blocks, attend_current=attend_current,
                                          causal=causal, partial_k=seq_len % block_k != 0)
  walk = functools.partial(tiles.walk_right_to_left, n_full=n_full, n_total=n_total, skip=skip,
                           blocks_per_check=blocks_per_check, stop=stop)
  live = (lambda s: s) if q_rows is None else (lambda s: jnp.where(q_rows, s, -jnp.inf))

  def tile(kb, log_stick, masked):
    keys = pl.ds(kb * block_k, block_k)
    k_rows = tiles.in_range(kb * block_k, block_k, seq_len, partial=seq_len % block_k != 0)
    k = tiles.load(k_ref.at[keys, :], rows=k_rows, cols=h_cols)  # [block_k, H]
    v = tiles.load(v_ref.at[keys, :], rows=k_rows, cols=hv_cols)  # [block_k, Hv]
    mask = None
    if masked or q_seg_ref is not None:
      k_seg = None if k_seg_ref is None else tiles.load(k_seg_ref.at[keys], rows=k_rows)
      mask = tiles.visible(q_pos, tiles.positions(kb * block_k, block_k), q_seg, k_seg,
                           attend_current=attend_current, causal=causal,
                           k_valid=None if causal else k_rows)
    gate = None if gate_ref is None else tiles.key_gate(tiles.load(gate_ref.at[keys], rows=k_rows))
    w, t = _tile(q, k, v, do, drem, log_stick, scale2=scale * tiles.LOG2E, mask=mask, gate=gate,
                 triangles=triangles, parts=cumsum_parts, gpu=gpu)
    return k, mask, gate, w, t

  def dq_tile(kb, carry, *, masked):
    # dz = dz_local - c P_start: dz_local needs only this block (G's in-block prefix), and the
    # prefix of the farther blocks, P_start [Q], is not known yet. Its share of dq,
    # sum_b P_start(b) (c_b @ k_b) = sum_b g_b (sum of c @ k over the blocks nearer than b), is
    # accumulated as the walk meets each block's G row sum g_b: a sum of products in walk order,
    # with no "total minus suffix" cancellation.
    dq, near_ck, dscale, near_cqk, log_stick = carry
    stick_ref[kb, :] = log_stick
    k, mask, gate, w, t = tile(kb, log_stick, masked)
    g = jnp.sum(t.d_log_a, axis=1)  # [block_q]
    prefix_ref[kb, :] = g  # block sums here; exclusive prefixes after the walk
    dz, _ = _logit_grads(w, t.d_log_a, zeros, mask=mask, gate=gate, triangles=triangles,
                         exact=q.dtype == jnp.float32)
    c = _prefix_coefficient(w, mask=mask, gate=gate)
    dq += tiles.dot(dz.astype(k.dtype), k, precision=precision) - g[:, None] * near_ck
    near_ck += tiles.dot(c.astype(k.dtype), k, precision=precision)  # [block_q, H]
    dscale += jnp.sum(dz * t.qk, axis=1) - g * near_cqk
    near_cqk += jnp.sum(c * t.qk, axis=1)
    return dq, near_ck, dscale, near_cqk, log_stick + t.stick_sum

  zeros = jnp.zeros((block_q,), jnp.float32)
  carry = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(q.shape, jnp.float32), zeros, zeros, zeros)
  first, (dq, _, dscale, _, _) = walk(dq_tile, carry, lambda c: live(c[4]))
  if gpu:
    plgpu.debug_barrier()  # the block sums were stored by other threads than may read them

  def unwalked(kb, _):  # blocks the walk never reached: weights and G exactly 0 for dk/dv
    prefix_ref[kb, :] = zeros
    stick_ref[kb, :] = jnp.full((block_q,), _NO_STICK, jnp.float32)

  def to_prefix(kb, running):  # block sums -> exclusive prefixes from the left
    block_sum = prefix_ref[kb, :]
    if gpu:
      plgpu.debug_barrier()  # every thread has read the sums before any overwrites them
    prefix_ref[kb, :] = running
    return running + block_sum

  jax.lax.fori_loop(0, first, unwalked, None)
  jax.lax.fori_loop(first, n_total, to_prefix, zeros)
  tiles.store(dq_ref, (dq * scale).astype(dq_ref.dtype), rows=q_rows, cols=h_cols)
  if q_rows is not None:
    dscale = jnp.where(q_rows, dscale, 0.0)
  dscale_ref[...] = jnp.full((1,), jnp.sum(dscale), jnp.float32)
  first_ref[...] = jnp.full((1,), first, jnp.int32)


def _dkv_kernel(scale_ref, row_end_ref, q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, gate_ref, do_ref,
                drem_ref, stick_ref, prefix_ref, dk_ref, dv_ref, dgate_ref, *,
                seq_len, head_dim, head_dim_v, block_q, block_k, group, attend_current, causal,
                cumsum_parts, gpu):
  kb = pl.program_id(0)
  h_cols = tiles.in_range(0, k_ref.shape[-1], head_dim, partial=k_ref.shape[-1] != head_dim)
  hv_cols = tiles.in_range(0, v_ref.shape[-1], head_dim_v, partial=v_ref.shape[-1] != head_dim_v)
  k_rows = tiles.in_range(kb * block_k, block_k, seq_len, partial=seq_len % block_k != 0)
  k = tiles.load(k_ref, rows=k_rows, cols=h_cols)  # [block_k, H]
  v = tiles.load(v_ref, rows=k_rows, cols=hv_cols)  # [block_k, Hv]
  k_pos = tiles.positions(kb * block_k, block_k)
  k_seg = None if k_seg_ref is None else tiles.load(
      k_seg_ref.at[pl.ds(kb * block_k, block_k)], rows=k_rows)
  # Cross-chunk mode: keys past the chunk's end (a partial last block) are masked in every tile.
  mask_keys = not causal and k_rows is not None
  gate = None if gate_ref is None else tiles.key_gate(tiles.load(gate_ref, rows=k_rows))
  scale = scale_ref[0]
  precision = tiles.dot_precision(k.dtype)
  triangles = _Triangles.make(block_k)
  partial_rows = seq_len % block_q != 0

  # Every tile of the loops below is computed: no per-tile test of the recorded sticks (a
  # ``lax.cond`` around the loads stops Triton from pipelining the loop). Tiles whose rows the dq
  # walk never reached read the stick ``_NO_STICK`` and the prefix 0, so their weights and
  # gradients are exactly 0; ``row_end`` bounds the loops to the row blocks that reached the block.
  def tile(j, carry, *, head, masked):
    dk, dv, dg = carry
    rows = pl.ds(j * block_q, block_q)
    q_rows = tiles.in_range(j * block_q, block_q, seq_len, partial=partial_rows)
    log_stick = stick_ref[head, rows]  # [block_q]
    q = tiles.load(q_ref.at[rows, head, :], rows=q_rows, cols=h_cols)  # [block_q, H]
    do = tiles.load(do_ref.at[rows, head, :], rows=q_rows, cols=hv_cols)  # [block_q, Hv]
    drem = tiles.load(drem_ref.at[head, rows], rows=q_rows)  # [block_q]
    mask = None
    if masked or q_seg_ref is not None or mask_keys:
      q_seg = None if q_seg_ref is None else tiles.load(q_seg_ref.at[rows], rows=q_rows)
      mask = tiles.visible(tiles.positions(j * block_q, block_q), k_pos, q_seg, k_seg,
                           attend_current=attend_current, causal=causal,
                           k_valid=k_rows if mask_keys else None)
      if partial_rows:  # rows past the sequence end hold no gradient
        mask = mask & q_rows[:, None]
    w, t = _tile(q, k, v, do, drem, log_stick, scale2=scale * tiles.LOG2E, mask=mask, gate=gate,
                 triangles=triangles, parts=cumsum_parts, gpu=gpu)
    dz, dg_tile = _logit_grads(w, t.d_log_a, prefix_ref[head, rows], mask=mask, gate=gate,
                               triangles=triangles, exact=q.dtype == jnp.float32)
    dv += tiles.dot(t.a.astype(do.dtype), do, trans_a=True, precision=precision)  # [block_k, Hv]
    dk += tiles.dot(dz.astype(q.dtype), q, trans_a=True, precision=precision)  # [block_k, H]
    if dg is not None:
      dg += jnp.sum(dg_tile, axis=0)  # [block_k]
    return dk, dv, dg

  # Query blocks with a row that sees a key of this block and whose walk reached it:
  # [j_first, j_end); rows of [j_first, j_full) may miss some of its keys, and a last, partial
  # block [j_whole, ...) has rows past the sequence end: both masked.
  j_first, j_full = tiles.query_blocks_seeing(kb, block_k=block_k, block_q=block_q,
                                              attend_current=attend_current, causal=causal)
  j_end = jnp.minimum(tiles.div(row_end_ref[0] + block_q - 1, block_q),
                      tiles.cdiv(seq_len, block_q))
  j_whole = seq_len // block_q

  def head_loop(head, carry):
    masked = functools.partial(tile, head=head, masked=True)
    carry = jax.lax.fori_loop(j_first, jnp.minimum(j_full, j_end), masked, carry)
    carry = jax.lax.fori_loop(j_full, jnp.minimum(j_end, j_whole),
                              functools.partial(tile, head=head, masked=False), carry)
    if partial_rows:
      carry = jax.lax.fori_loop(jnp.maximum(j_full, j_whole), j_end, masked, carry)
    return carry

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
           None if gate is None else jnp.zeros((block_k,), jnp.float32))
  dk, dv, dg = jax.lax.fori_loop(0, group, head_loop, carry)
  tiles.store(dk_ref, (dk * scale).astype(dk_ref.dtype), rows=k_rows, cols=h_cols)
  tiles.store(dv_ref, dv.astype(dv_ref.dtype), rows=k_rows, cols=hv_cols)
  if dgate_ref is not None:
    tiles.store(dgate_ref, dg, rows=k_rows)


def backward(q, k, v, scale, segment_ids, forget_gate, d_out, d_rem, *, attend_current: bool,
             block_sizes: BlockSizes, skip_tolerance: float, interpret: bool, causal: bool = True,
             key_segment_ids=None):
  """Gradients of ``pallas_triton_fwd.forward``.

  Args:
    q, k, v, scale, segment_ids, forget_gate, causal, key_segment_ids: as for
      ``pallas_triton_fwd.forward``.
    d_out: ``[B, T, N, Hv]``; d_rem: ``[B, N, T]`` cotangents.

  Returns:
    ``(dq, dk, dv, dscale, dforget_gate)`` in the dtypes of the inputs (``dforget_gate`` None
    without a gate).
  """
  b, t, n, h = q.shape
  num_kv_heads, hv = k.shape[2], v.shape[-1]
  group = n // num_kv_heads
  hp, hvp = tiles.padded_head_dim(h), tiles.padded_head_dim(hv)
  bq, bk, bq_kv = block_sizes.block_q_dq, block_sizes.block_k_bwd, block_sizes.block_q_dkv
  nq, nkb = tiles.cdiv(t, bq), tiles.cdiv(t, bk)
  rows_padded = tiles.cdiv(t, max(bq, bq_kv)) * max(bq, bq_kv)  # rows of the boundary sums
  d_rem = d_rem.astype(jnp.float32)
  k_seg = segment_ids if causal else key_segment_ids
  common = dict(seq_len=t, head_dim=h, head_dim_v=hv, attend_current=attend_current, causal=causal,
                cumsum_parts=tiles.cumsum_parts(q.dtype), gpu=not interpret)
  params = plgpu.CompilerParams(num_warps=block_sizes.num_warps_bwd,
                                num_stages=block_sizes.num_stages_bwd)
  optional = lambda spec: lambda x: None if x is None else spec  # for optional inputs

  q_block = lambda i: tiles.heaviest_first(i, nq)
  kv_head = lambda ni: ni // group
  per_program = pl.BlockSpec((None, None, 1), lambda i, bi, ni: (bi, ni, q_block(i)))
  boundary = pl.BlockSpec((None, None, nkb, bq), lambda i, bi, ni: (bi, ni, 0, q_block(i)))
  dq, dscale, first, stick, prefix = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_k=bk, skip=block_sizes.skip_used_stick,
                        blocks_per_check=block_sizes.num_blocks_per_check_bwd,
                        stop=tiles.stop_log2(skip_tolerance), **common),
      grid=(nq, b, n),
      in_specs=[
          pl.BlockSpec((1,), lambda i, bi, ni: (0,)),
          pl.BlockSpec((None, bq, None, hp), lambda i, bi, ni: (bi, q_block(i), ni, 0)),
          pl.BlockSpec((None, t, None, hp), lambda i, bi, ni: (bi, 0, kv_head(ni), 0)),
          pl.BlockSpec((None, t, None, hvp), lambda i, bi, ni: (bi, 0, kv_head(ni), 0)),
          optional(pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0)))(segment_ids),
          optional(pl.BlockSpec((None, t), lambda i, bi, ni: (bi, 0)))(k_seg),
          optional(pl.BlockSpec((None, t, None), lambda i, bi, ni: (bi, 0, kv_head(ni))))(forget_gate),
          pl.BlockSpec((None, bq, None, hvp), lambda i, bi, ni: (bi, q_block(i), ni, 0)),
          pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, q_block(i))),
      ],
      out_specs=[
          pl.BlockSpec((None, bq, None, hp), lambda i, bi, ni: (bi, q_block(i), ni, 0)),
          per_program,
          per_program,
          boundary,
          boundary,
      ],
      out_shape=[
          jax.ShapeDtypeStruct(q.shape, q.dtype),
          jax.ShapeDtypeStruct((b, n, nq), jnp.float32),
          jax.ShapeDtypeStruct((b, n, nq), jnp.int32),
          jax.ShapeDtypeStruct((b, n, nkb, rows_padded), jnp.float32),
          jax.ShapeDtypeStruct((b, n, nkb, rows_padded), jnp.float32),
      ],
      compiler_params=params,
      interpret=interpret,
      name="stick_breaking_bwd_dq",
  )(scale, q, k, v, segment_ids, k_seg, forget_gate, d_out, d_rem)

  row_end = live_row_end(first, bq, nkb, num_kv_heads)
  group_boundary = pl.BlockSpec((None, group, None, rows_padded),
                                lambda kb, bi, ki: (bi, ki, kb, 0))
  key_block = lambda width: pl.BlockSpec((None, bk, None, width),
                                         lambda kb, bi, ki: (bi, kb, ki, 0))
  gate_block = pl.BlockSpec((None, bk, None), lambda kb, bi, ki: (bi, kb, ki))
  dk, dv, dgate = pl.pallas_call(
      functools.partial(_dkv_kernel, block_q=bq_kv, block_k=bk, group=group, **common),
      grid=(nkb, b, num_kv_heads),
      in_specs=[
          pl.BlockSpec((1,), lambda kb, bi, ki: (0,)),
          pl.BlockSpec((None, None, 1), lambda kb, bi, ki: (bi, ki, kb)),
          pl.BlockSpec((None, t, group, hp), lambda kb, bi, ki: (bi, 0, ki, 0)),
          key_block(hp),
          key_block(hvp),
          optional(pl.BlockSpec((None, t), lambda kb, bi, ki: (bi, 0)))(segment_ids),
          optional(pl.BlockSpec((None, t), lambda kb, bi, ki: (bi, 0)))(k_seg),
          optional(gate_block)(forget_gate),
          pl.BlockSpec((None, t, group, hvp), lambda kb, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, group, t), lambda kb, bi, ki: (bi, ki, 0)),
          group_boundary,
          group_boundary,
      ],
      out_specs=[key_block(hp), key_block(hvp), optional(gate_block)(forget_gate)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 optional(jax.ShapeDtypeStruct(forget_gate.shape if forget_gate is not None else (),
                                          jnp.float32))(forget_gate)],
      compiler_params=params,
      interpret=interpret,
      name="stick_breaking_bwd_dkv",
  )(scale, row_end, q, k, v, segment_ids, k_seg, forget_gate, d_out, d_rem, stick, prefix)
  return dq, dk, dv, jnp.sum(dscale).reshape(scale.shape), dgate
