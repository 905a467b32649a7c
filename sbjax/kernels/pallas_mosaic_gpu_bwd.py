"""Backward Pallas Mosaic GPU kernels (Hopper): dq with per-row boundary records, then dk/dv.

The two-walk formulation of the Triton backward (``pallas_triton_bwd``; docs/design.md §1
Gradient and §6), with ``G_ji = dL/dlog A_ji = A_ji (do_j . v_i - drem_j)`` and the exclusive
left prefix ``P_ji = sum_{m < i} G_jm``:

    ungated:  dz = G - s (P + G)                                     (s = sigmoid(z))
    gated:    dz = (1 - s) (G - P beta / (1 - beta)),   dg_i = sum_j (1 - f_i) (G - P beta / (1 - beta))

- The dq kernel (one warpgroup, 64 query rows, grid ``(T / 64, N, B)``) walks 64-key blocks from
  the diagonal leftwards, as the forward does, with the K/V tiles on a TMA ring it fills itself,
  and takes each block in tiles of ``block_k_dq`` keys (32 by default), nearest first.
  Per tile, five wgmma: ``q k^T`` and ``do v^T`` (issued together), the in-block sums of
  ``log2(1 - beta)`` (nearer keys) and of ``G`` (farther keys, 3 bf16 parts: fp32 accuracy),
  ``dz @ k`` and ``c @ k`` (``c`` the coefficient of ``P`` in ``dz``). ``P``'s farther-block
  share of ``dq`` is ``sum_b g_b (sum of c @ k over the blocks nearer than b)``, ``g_b`` the
  block's row sum of ``G``: a sum of products in walk order, with no "total minus suffix"
  cancellation. Each step records the rows' log2-stick right of the block and ``g_b`` (TMA
  stores of ``[64]`` rows into ``[B, N, T / 64, T]``); the walk stops where the forward's does.
- Between the kernels, XLA turns the block sums into exclusive prefixes from the left and marks
  the blocks a row block never walked (stick ``-1e30``, prefix 0: weights and gradients exactly
  0 there).
- The dk/dv kernel (one warpgroup, grid ``(T / 64, K, B)``) holds one key block of a kv head and
  walks the query blocks (of every head of its group) whose walk reached it, with their ``q`` and
  ``do`` tiles on a TMA ring, recomputing ``A`` and ``dz`` from the records (in ``block_k_dkv``
  keys at a time: with 32, the nearer half first for the stick, then ``dz`` left half first for
  ``G``'s prefix); ``A^T @ do`` and ``dz^T @ q`` take ``A`` and ``dz`` through shared memory as
  transposed left operands (wgmma transposes 16-bit SMEM operands, not register ones).

The cross-chunk mode (``causal=False``, as the forward's): the dq walk takes every key block
with real keys, and each dk/dv program every query block that reached its key block; a partial
last key block is masked in both.

No atomics: each output block has one writer, so the gradients are bitwise deterministic.
Interpret mode reads every left operand from SMEM and cannot run ``pl.run_state``; the compiled
kernels keep the left operands in registers and accumulate ``dq``, ``dk`` and ``dv`` in place.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from sbjax.common import live_row_end, stop_log2
from sbjax.kernels import pallas_mosaic_gpu_tiles as tiles
from sbjax.kernels.pallas_mosaic_gpu_config import MosaicBlockSizes

DQ_NAME = "stick_breaking_bwd_dq_mosaic_gpu"
DKV_NAME = "stick_breaking_bwd_dkv_mosaic_gpu"
BLOCK = 64  # rows per tile, and keys per walked (and recorded) block: one warpgroup's rows
_NO_STICK = -1e30  # log2-stick recorded for the key blocks a row block's walk never reached
# In-block prefixes of G always get fp32 accuracy (3 bf16 parts), as in the Triton backward: G
# spans many magnitudes, and dscale weighs its errors by q . k.
_G_PARTS = 3
_SHAPE = (BLOCK, BLOCK)


class _Tile:
  """One ``[64 rows, 64 keys]`` tile of the backward (fp32, WGMMA layout): the weights ``a``,
  ``g = G``, the stick terms and the row sums of ``log2(1 - beta)``."""

  def __init__(self, qk, do_v, log_stick, drem, *, scale2, mask, gate, tri_nearer, parts,
               part_smem, registers):
    shape = qk.shape  # [64 rows, keys of the tile]
    x = qk * tiles.row_bcast(scale2, shape)  # base-2 logits
    self.log_s, self.log_1m_s = tiles.sigmoid_terms(x)
    self.log_beta, self.log_1m_beta = (
        (self.log_s, self.log_1m_s) if gate is None
        else tiles.gated_terms(self.log_s, self.log_1m_s, gate))
    if mask is not None:
      self.log_1m_beta = jnp.where(mask, self.log_1m_beta, 0.0)
    nearer = tiles.in_block_sums(self.log_1m_beta, tri_nearer, parts=parts, smem=part_smem,
                                 registers=registers)
    a = jnp.exp2(self.log_beta + nearer + tiles.row_bcast(log_stick, shape))
    self.a = a if mask is None else jnp.where(mask, a, 0.0)
    self.g = self.a * (do_v - tiles.row_bcast(drem, shape))  # G = dL/dlog A
    self.mask, self.gate = mask, gate

  def logit_grads(self, prefix, tri_prefix, *, part_smem, registers):
    """``(dz, dg or None)``, ``[64, 64]`` each, with ``prefix [64]`` (or None: 0) the sum of ``G``
    over the keys left of the tile; ``tri_prefix`` pairs ``m <= i`` (ungated) or ``m < i``."""
    in_block = tiles.in_block_sums(self.g, tri_prefix, parts=_G_PARTS, smem=part_smem,
                                   registers=registers)
    p = in_block if prefix is None else in_block + tiles.row_bcast(prefix, in_block.shape)
    dg = None
    if self.gate is None:  # bf16/fp16: dz = G - s (P + G); its cancellation where s ~ 1 is below
      dz = self.g - jnp.exp2(self.log_s) * p  # the inputs' resolution
    else:
      log_odds = self.log_beta - self.log_1m_beta  # log2(beta / (1 - beta)); exponents <= 0
      log_1mf = self.gate[1]
      dz = jnp.exp2(self.log_1m_s) * self.g - jnp.exp2(log_odds + self.log_1m_s) * p
      dg = jnp.exp2(log_1mf) * self.g - jnp.exp2(log_odds + log_1mf) * p
    if self.mask is not None:
      dz = jnp.where(self.mask, dz, 0.0)
      dg = None if dg is None else jnp.where(self.mask, dg, 0.0)
    return dz, dg

  def prefix_coefficient(self):
    """``c`` with ``dz = (dz at a zero left prefix) - c P``: ``sigmoid(z)``, or
    ``beta / (1 - beta) (1 - sigmoid(z))`` gated; 0 where invisible."""
    c = jnp.exp2(self.log_s if self.gate is None
                 else self.log_beta - self.log_1m_beta + self.log_1m_s)
    return c if self.mask is None else jnp.where(self.mask, c, 0.0)


def _two_products(a_smem, b_smem, c_smem, d_smem, shape=_SHAPE):
  """``(a @ b, c @ d)`` (``shape`` each) in fresh fp32 accumulators, issued together and waited
  for once."""
  def body(x_ref, y_ref):
    plgpu.wgmma(x_ref, a_smem, b_smem)
    plgpu.wgmma(y_ref, c_smem, d_smem)
    return x_ref[...], y_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _accumulate(pairs, *, in_place: bool):
  """``[acc + lhs @ rhs for (acc, lhs, rhs) in pairs]``: accumulated on the tensor cores
  (``pl.run_state``, compiled only), or in fresh accumulators added in registers."""
  if not in_place:
    return [acc + tiles.matmul(x, y, acc.shape) for acc, x, y in pairs]

  def body(refs):
    for ref, (_, x, y) in zip(refs, pairs):
      plgpu.wgmma(ref, x, y)
  return list(pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc, _, _ in pairs)))


def _rows(ref, start):
  """``ref[start : start + 64]`` (fp32/int32 GMEM) as a row-layout vector."""
  return plgpu.load(ref.at[pl.ds(start, BLOCK)], layout=tiles.ROW, optimized=False)


def _prologue(fetch, total, scale_ref, tri_nearer, tri_prefix, *, num_buffers, gated):
  """A kernel's start: the ring's first ``num_buffers - 1`` copies (of ``total`` steps), the two
  triangles (nearer keys; ``G``'s prefix: ``m <= i``, or ``m < i`` gated), the scale row [64]."""
  tiles.prefetch_first(fetch, total, num_buffers)
  tiles.build_triangle(tri_nearer)
  tiles.build_triangle(tri_prefix, (lambda m, i: m < i) if gated else (lambda m, i: m <= i))
  return plgpu.load(scale_ref, layout=tiles.ROW, optimized=False)


def _dq_kernel(scale_ref, seg_ref, gate_ref, q_ref, k_ref, v_ref, do_ref, drem_ref, dq_ref,
               dscale_ref, first_ref, stick_ref, gsum_ref, *scratch, num_buffers, group,
               attend_current, cumsum_parts, registers, in_place, num_q_blocks, stop, seq_len,
               sub, cross):
  (q_smem, do_smem, k_smem, v_smem, tri_nearer, tri_prefix, part_smem, p_smem, rec_smem,
   out_rows, first_rows, barriers) = scratch
  q_barriers, k_barriers, v_barriers = barriers
  q_block, head, batch = tiles.program_ids(num_q_blocks, heavy_first=True)
  kv_head = lax.div(head, jnp.array(group, head.dtype))
  q_start = q_block * BLOCK
  rows = (batch, pl.ds(q_start, BLOCK), head)
  plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_barriers.at[0])
  plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, q_barriers.at[1])
  lag = 0 if attend_current else 1
  n_full, n_total = tiles.key_blocks(q_start, BLOCK, block_k=BLOCK, lag=lag, cross=cross)
  slot_of = lambda step: lax.rem(step, jnp.int32(num_buffers))

  fetch = tiles.kv_ring_fetch(k_ref, v_ref, k_smem, v_smem, k_barriers, v_barriers, batch=batch,
                              kv_head=kv_head, n_total=n_total, block_k=BLOCK,
                              num_buffers=num_buffers)
  scale = _prologue(fetch, n_total, scale_ref, tri_nearer, tri_prefix,
                    num_buffers=num_buffers, gated=gate_ref is not None)
  drem = _rows(drem_ref.at[batch, head], q_start)
  q_seg = None if seg_ref is None else _rows(seg_ref.at[batch], q_start)
  plgpu.barrier_wait(q_barriers.at[0])
  plgpu.barrier_wait(q_barriers.at[1])
  dt = q_smem.dtype

  def record(step, kb, log_stick, g):  # [64] rows into [B, N, T / 64, T], two slots in flight
    slot = lax.rem(step, jnp.int32(2))
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copies that read this slot are done
    rec_smem.at[slot, 0][...] = log_stick
    rec_smem.at[slot, 1][...] = g
    plgpu.commit_smem()
    for i, ref in enumerate((stick_ref, gsum_ref)):
      plgpu.copy_smem_to_gmem(rec_smem.at[slot, i],
                              ref.at[batch, head, kb, pl.ds(q_start, BLOCK)], commit_group=False)
    plgpu.commit_smem_to_gmem_group()

  sub_shape = (BLOCK, sub)
  tri = lambda ref: ref if sub == BLOCK else ref.at[pl.ds(0, sub)]  # (64, sub): rows < sub
  tri_nearer, tri_prefix = tri(tri_nearer), tri(tri_prefix)

  def sub_tile(carry, slot, k_start, off, *, masked):
    """The keys ``[off, off + sub)`` of the ring slot's block (``k_start``: the first's position);
    returns the carry and the rows' sum of ``G`` over them."""
    dq, near_ck, dscale, near_cqk, log_stick = carry
    mask = None
    if masked:
      mask = tiles.visible(q_start, k_start, q_seg,
                           None if seg_ref is None else seg_ref.at[batch], lag=lag,
                           shape=sub_shape, cross=cross)
    gate = None if gate_ref is None else tiles.key_gate(
        gate_ref.at[batch, kv_head, pl.ds(k_start, sub)], sub_shape)
    k_tile, v_tile = (x.at[slot] if sub == BLOCK else x.at[slot, pl.ds(off, sub)]
                      for x in (k_smem, v_smem))
    qk, do_v = _two_products(q_smem, k_tile.T, do_smem, v_tile.T, sub_shape)
    t = _Tile(qk, do_v, log_stick, drem, scale2=scale * tiles.LOG2E, mask=mask, gate=gate,
              tri_nearer=tri_nearer, parts=cumsum_parts, part_smem=part_smem, registers=registers)
    g = jnp.sum(t.g, axis=1)  # [64]: the rows' sums of G over these keys
    dz, _ = t.logit_grads(None, tri_prefix, part_smem=part_smem, registers=registers)
    c = t.prefix_coefficient()
    # dq gets dz @ k and the farther keys' prefix share: -g times the nearer keys' c @ k.
    dq = dq - tiles.row_bcast(g, dq.shape) * near_ck
    if registers:
      dq, near_ck = _accumulate([(dq, dz.astype(dt), k_tile), (near_ck, c.astype(dt), k_tile)],
                                in_place=in_place)
    else:  # one SMEM operand buffer: each product waited for before the next store
      dq = dq + tiles.matmul(tiles.lhs(dz.astype(dt), p_smem, False), k_tile, dq.shape)
      near_ck = near_ck + tiles.matmul(tiles.lhs(c.astype(dt), p_smem, False), k_tile, dq.shape)
    dscale = dscale + jnp.sum(dz * qk, axis=1) - g * near_cqk
    near_cqk = near_cqk + jnp.sum(c * qk, axis=1)
    log_stick = log_stick + jnp.sum(t.log_1m_beta, axis=1)
    return (dq, near_ck, dscale, near_cqk, log_stick), g

  def tile(step, carry, *, masked):
    """Walk step ``step``: key block ``n_total - 1 - step``, its sub-tiles nearest first."""
    # The slot refilled here held step - 1, whose wgmmas were waited for.
    nxt = step + num_buffers - 1
    pl.when(nxt < n_total)(functools.partial(fetch, nxt))
    slot = slot_of(step)
    kb = n_total - 1 - step
    plgpu.barrier_wait(k_barriers.at[slot])
    plgpu.barrier_wait(v_barriers.at[slot])
    log_stick, g_block = carry[4], None
    for off in range(BLOCK - sub, -1, -sub):
      carry, g = sub_tile(carry, slot, kb * BLOCK + off, off, masked=masked)
      g_block = g if g_block is None else g_block + g
    record(step, kb, log_stick, g_block)
    return carry

  zeros_h = plgpu.layout_cast(jnp.zeros(q_smem.shape, jnp.float32), plgpu.Layout.WGMMA)
  zeros = plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), tiles.ROW)
  carry = (zeros_h, zeros_h, zeros, zeros, zeros)
  padding = tiles.padding_rows(q_start, BLOCK, seq_len)
  # The diagonal blocks come first; with segments, every block is masked.
  n_masked = n_total if seg_ref is not None else n_total - n_full
  if stop is None:
    for masked, lo, hi in ((True, 0, n_masked), (False, n_masked, n_total)):
      carry = lax.fori_loop(lo, hi, functools.partial(tile, masked=masked), carry)
    steps = n_total
  else:  # until every row's stick (after the step) is used up, as the Triton dq walk
    state = (jnp.int32(0), jnp.bool_(True), carry)
    for masked, hi in ((True, n_masked), (False, n_total)):
      def step_once(state, masked=masked):
        step, _, carry = state
        carry = tile(step, carry, masked=masked)
        return step + 1, masked | (jnp.max(tiles.live(carry[4], padding)) > stop), carry
      state = lax.while_loop(lambda st, hi=hi: st[1] & (st[0] < hi), step_once, state)
    steps, _, carry = state
    tiles.drain_ring(steps, n_total, num_buffers, k_barriers, v_barriers)
  dq, _, dscale, _, _ = carry
  q_smem[...] = (dq * tiles.row_bcast(scale, dq.shape)).astype(dt)  # q is no longer read
  out_rows[...] = dscale
  first_rows[...] = plgpu.layout_cast(jnp.full((BLOCK,), n_total - steps, jnp.int32), tiles.ROW)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
  plgpu.copy_smem_to_gmem(out_rows, dscale_ref.at[batch, head, pl.ds(q_start, BLOCK)])
  plgpu.copy_smem_to_gmem(first_rows, first_ref.at[batch, head, pl.ds(q_start, BLOCK)])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(scale_ref, row_end_ref, seg_ref, gate_ref, q_ref, k_ref, v_ref, do_ref, drem_ref,
                rec_ref, dk_ref, dv_ref, dgate_ref, *scratch, num_buffers, group, attend_current,
                cumsum_parts, registers, in_place, num_q_blocks, seq_len, sub, cross):
  (k_smem, v_smem, q_smem, do_smem, rec_smem, drem_smem, tri_nearer, tri_prefix, part_smem,
   a_smem, dz_smem, dg_row, barriers) = scratch
  kv_barriers, q_barriers, do_barriers, rec_barriers, drem_barriers = barriers
  kb, kv_head, batch = (lax.axis_index(n) for n in ("k", "heads", "batch"))
  k_start = kb * BLOCK
  keys = (batch, pl.ds(k_start, BLOCK), kv_head)
  plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_barriers.at[0])
  plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_barriers.at[1])
  lag = 0 if attend_current else 1
  # Query blocks that see this key block: from j_first; from j_full on, every row sees every
  # key; up to the last one whose walk reached it (row_end, from the dq kernel's records).
  if cross is None:
    j_first = lax.div(k_start + lag, jnp.int32(BLOCK))
    j_full = lax.div(k_start + lag + 2 * BLOCK - 2, jnp.int32(BLOCK))
  else:  # every query block; a partial last key block (keys past the chunk's end) masked in all
    j_first = jnp.int32(0)
    j_full = jnp.where(k_start + BLOCK <= cross[0], 0, num_q_blocks).astype(jnp.int32)
  j_end = jnp.minimum(lax.div(row_end_ref[batch, kv_head, kb] + BLOCK - 1, jnp.int32(BLOCK)),
                      num_q_blocks)
  per_head = jnp.maximum(j_end - j_first, 0)
  slot_of = lambda step: lax.rem(step, jnp.int32(num_buffers))

  def fetch(step):  # step -> (head of the group, query block), heads outermost
    head = kv_head * group + lax.div(step, per_head)
    q_rows = pl.ds((j_first + lax.rem(step, per_head)) * BLOCK, BLOCK)
    slot = slot_of(step)
    for src, dst, barriers in (
        (q_ref.at[batch, q_rows, head], q_smem, q_barriers),
        (do_ref.at[batch, q_rows, head], do_smem, do_barriers),
        (rec_ref.at[batch, head, kb, :, q_rows], rec_smem, rec_barriers),  # stick, prefix
        (drem_ref.at[batch, head, q_rows], drem_smem, drem_barriers)):
      plgpu.copy_gmem_to_smem(src, dst.at[slot], barriers.at[slot])

  total = group * per_head
  scale = _prologue(fetch, total, scale_ref, tri_nearer, tri_prefix, num_buffers=num_buffers,
                    gated=gate_ref is not None)
  sub_shape = (BLOCK, sub)
  offsets = range(BLOCK - sub, -1, -sub)  # the tile's key halves (or the whole), nearest first
  keys_of = lambda ref, off: ref if sub == BLOCK else ref.at[pl.ds(off, sub)]  # rows of k, v
  cols_of = lambda ref, off: ref if sub == BLOCK else ref.at[:, pl.ds(off, sub)]  # of a, dz
  tri_nearer, tri_prefix = keys_of(tri_nearer, 0), keys_of(tri_prefix, 0)  # (sub, sub)
  gates = {off: None if gate_ref is None else tiles.key_gate(
      gate_ref.at[batch, kv_head, pl.ds(k_start + off, sub)], sub_shape) for off in offsets}
  plgpu.barrier_wait(kv_barriers.at[0])
  plgpu.barrier_wait(kv_barriers.at[1])
  dt = k_smem.dtype

  def tile(j, carry, *, h, masked):
    dk, dv, dg = carry
    step = h * per_head + j - j_first
    # The slot refilled here held step - 1, whose wgmmas were waited for.
    nxt = step + num_buffers - 1
    pl.when(nxt < total)(functools.partial(fetch, nxt))
    slot = slot_of(step)
    q_start = j * BLOCK
    q_seg = None if seg_ref is None or not masked else _rows(seg_ref.at[batch], q_start)
    for barriers in (q_barriers, do_barriers, rec_barriers, drem_barriers):
      plgpu.barrier_wait(barriers.at[slot])
    row = lambda smem: plgpu.load(smem, layout=tiles.ROW, optimized=False)  # [64]
    log_stick, prefix = row(rec_smem.at[slot, 0]), row(rec_smem.at[slot, 1])
    drem = row(drem_smem.at[slot])
    q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
    halves = {}
    for off in offsets:  # nearest first: each half's stick includes the nearer halves' keys
      mask = None if not masked else tiles.visible(
          q_start, k_start + off, q_seg, None if seg_ref is None else seg_ref.at[batch], lag=lag,
          seq_len=seq_len, shape=sub_shape, cross=cross)
      qk, do_v = _two_products(q_tile, keys_of(k_smem, off).T, do_tile, keys_of(v_smem, off).T,
                               sub_shape)
      t = _Tile(qk, do_v, log_stick, drem, scale2=scale * tiles.LOG2E, mask=mask,
                gate=gates[off], tri_nearer=tri_nearer, parts=cumsum_parts, part_smem=part_smem,
                registers=registers)
      cols_of(a_smem, off)[...] = t.a.astype(dt)  # before dz: A need not stay live through it
      if off:
        log_stick = log_stick + jnp.sum(t.log_1m_beta, axis=1)
      halves[off] = t
    dg_halves = []
    for off in reversed(offsets):  # left first: each half's G prefix includes the farther halves'
      t = halves.pop(off)
      dz, dg_tile = t.logit_grads(prefix, tri_prefix, part_smem=part_smem, registers=registers)
      cols_of(dz_smem, off)[...] = dz.astype(dt)
      if off + sub < BLOCK:
        prefix = prefix + jnp.sum(t.g, axis=1)
      if dg is not None:
        dg_halves.append(jnp.sum(dg_tile, axis=0))  # [sub] keys
    plgpu.commit_smem()
    dv, dk = _accumulate([(dv, a_smem.T, do_tile), (dk, dz_smem.T, q_tile)], in_place=in_place)
    if dg is not None:
      dg = tuple(acc + x for acc, x in zip(dg, dg_halves))
    return dk, dv, dg

  # The launcher's padded rows (zeros) are masked in the last query block: zeros times an
  # infinite key are NaN, which a transposed product would spread over the whole key block.
  j_whole = num_q_blocks if seq_len is None else seq_len // BLOCK

  def head_loop(h, carry):
    masked = functools.partial(tile, h=h, masked=True)
    if seg_ref is not None:  # keys of another segment can lie anywhere: every tile masked
      return lax.fori_loop(j_first, j_end, masked, carry)
    carry = lax.fori_loop(j_first, jnp.minimum(j_full, j_end), masked, carry)
    carry = lax.fori_loop(j_full, jnp.minimum(j_end, j_whole),
                          functools.partial(tile, h=h, masked=False), carry)
    if seq_len is not None:
      carry = lax.fori_loop(jnp.maximum(j_full, j_whole), j_end, masked, carry)
    return carry

  zeros_h = plgpu.layout_cast(jnp.zeros(k_smem.shape, jnp.float32), plgpu.Layout.WGMMA)
  dg = None if gate_ref is None else tuple(  # per half, left to right
      plgpu.layout_cast(jnp.zeros((sub,), jnp.float32), tiles.COL) for _ in offsets)
  dk, dv, dg = lax.fori_loop(0, group, head_loop, (zeros_h, zeros_h, dg))
  k_smem[...] = (dk * tiles.row_bcast(scale, dk.shape)).astype(dt)  # k, v are no longer read
  v_smem[...] = dv.astype(dt)
  if dg is not None:
    for off, dg_half in zip(reversed(offsets), dg):
      keys_of(dg_row, off)[...] = dg_half
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
  if dg is not None:
    plgpu.copy_smem_to_gmem(dg_row, dgate_ref.at[batch, kv_head, pl.ds(k_start, BLOCK)])
  plgpu.wait_smem_to_gmem(0)


def _records(first, stick, gsum, *, attend_current: bool, cross=None):
  """``[B, N, T / 64, 2, T]``: the dk/dv kernel's per-(row, key block) inputs from the dq kernel's
  records, the log2-stick right of the block (``_NO_STICK`` where the row block's walk never
  reached it) and the exclusive prefix of ``G`` from the left (0 there). ``first [B, N, T]``: each
  row's leftmost walked key block; ``stick``, ``gsum``: ``[B, N, T / 64, T]``, written only where
  walked."""
  nkb, tp = stick.shape[2], stick.shape[3]
  lag = 0 if attend_current else 1
  kb = jnp.arange(nkb)[:, None]  # [nkb, 1]
  rows = jnp.arange(tp, dtype=jnp.int32)[None, :]
  _, n_total = tiles.key_blocks(rows - rows % BLOCK, BLOCK, block_k=BLOCK, lag=lag, cross=cross)
  walked = (kb >= first[:, :, None, :]) & (kb < n_total)  # [B, N, nkb, T]
  g = jnp.where(walked, gsum, 0.0)
  prefix = jnp.concatenate([jnp.zeros_like(g[:, :, :1]), jnp.cumsum(g, axis=2)[:, :, :-1]], axis=2)
  return jnp.stack([jnp.where(walked, stick, _NO_STICK), prefix], axis=3)


def backward(q, k, v, scale, segment_ids, forget_gate, d_out, d_rem, *, attend_current: bool,
             block_sizes: MosaicBlockSizes, skip_tolerance: float, interpret=False,
             causal: bool = True, key_segment_ids=None):
  """Gradients of ``pallas_mosaic_gpu_fwd.forward``.

  Args:
    q, k, v, scale, segment_ids, forget_gate, attend_current, skip_tolerance, interpret, causal,
      key_segment_ids: as for ``pallas_mosaic_gpu_fwd.forward`` (``interpret``: False or
      ``plgpu.InterpretGPUParams``; ``causal=False``: the cross-chunk mode, every query block
      against every key block with real keys).
    block_sizes: its ``num_buffers_bwd``, ``block_k_dq``, ``block_k_dkv``,
      ``operands_in_registers`` and ``skip_used_stick`` apply (64-row tiles).
    d_out: ``[B, T, N, H]``; d_rem: ``[B, N, T]`` cotangents.

  Returns:
    ``(dq, dk, dv, dscale [1], dforget_gate [B, T, K] or None)``, in the inputs' dtypes.
  """
  b, t, n, h = q.shape
  num_kv_heads = k.shape[2]
  group = n // num_kv_heads
  tp = tiles.cdiv(t, BLOCK) * BLOCK
  # Zeros: padded rows get G = 0 and add nothing (the dk/dv kernel masks them: zeros times an
  # infinite key are NaN); padded keys follow every real row.
  q, k, v, d_out, segment_ids, forget_gate, key_segment_ids = (
      tiles.pad_time(x, tp) for x in (q, k, v, d_out, segment_ids, forget_gate, key_segment_ids))
  d_rem = tiles.pad_time(d_rem, tp, axis=2)
  cross = None
  if not causal:  # as the forward
    segment_ids, cross = tiles.cross_chunk(segment_ids, key_segment_ids, t)
  nq = tp // BLOCK
  dtype, nb = q.dtype, block_sizes.num_buffers_bwd
  registers = block_sizes.operands_in_registers and not interpret
  sub = block_sizes.block_k_dq
  # 16-bit tiles swizzled in groups of `width` elements (128 bytes for 64): wgmma's contraction
  # length must be a multiple of it and both operands share it, so every tile of a kernel takes
  # its `sub` (keys per tile).
  smem = lambda shape, dt, width=64: plgpu.SMEM(shape, dt, transforms=(
      plgpu.TilingTransform((8, width)), plgpu.SwizzleTransform(width * 2)))
  # SMEM left operands (interpret mode; compiled, they stay in registers)
  operand = lambda dt, width=BLOCK: None if registers else smem((BLOCK, width), dt, width)
  common = dict(num_buffers=nb, group=group, attend_current=attend_current,
                cumsum_parts=tiles.cumsum_parts(dtype), registers=registers,
                in_place=registers, num_q_blocks=nq, seq_len=t if tp != t else None, cross=cross)
  params = dict(compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret)
  given, with_optional = tiles.optional_inputs(segment_ids, forget_gate)

  scale_rows = jnp.broadcast_to(jnp.reshape(scale, ()).astype(jnp.float32), (BLOCK,))
  d_rem = d_rem.astype(jnp.float32)
  skip = block_sizes.skip_used_stick
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dq, dscale, first, stick, gsum = plgpu.kernel(
      with_optional(functools.partial(_dq_kernel, stop=stop_log2(skip_tolerance) if skip else None,
                                      sub=sub, **common), 1),
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype), f32((b, n, tp)),
                jax.ShapeDtypeStruct((b, n, tp), jnp.int32), f32((b, n, nq, tp)),
                f32((b, n, nq, tp))),
      scratch_types=(
          smem((BLOCK, h), dtype, sub), smem((BLOCK, h), dtype, sub),  # q (then dq), do
          smem((nb, BLOCK, h), dtype, sub), smem((nb, BLOCK, h), dtype, sub),  # k, v rings
          smem((BLOCK, sub), jnp.bfloat16, sub), smem((BLOCK, sub), jnp.bfloat16, sub),  # triangles
          operand(jnp.bfloat16, sub), operand(dtype, sub),  # parts; dz and c
          plgpu.SMEM((2, 2, BLOCK), jnp.float32),  # the records' staging (two steps in flight)
          plgpu.SMEM((BLOCK,), jnp.float32), plgpu.SMEM((BLOCK,), jnp.int32),  # dscale, first
          (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=nb),
           plgpu.Barrier(num_barriers=nb)),
      ),
      grid=(nq, n, b), grid_names=("q", "heads", "batch"), kernel_name=DQ_NAME, **params,
  )(scale_rows, *given, q, k, v, d_out, d_rem)

  first_blocks = first[:, :, ::BLOCK]  # [B, N, nq]: every row of a block shares its walk
  row_end = live_row_end(first_blocks, BLOCK, nq, num_kv_heads)
  records = _records(first, stick, gsum, attend_current=attend_current, cross=cross)
  sub = block_sizes.block_k_dkv  # the same swizzle rule: every tile takes `sub`
  dk, dv, dgate = plgpu.kernel(
      with_optional(functools.partial(_dkv_kernel, sub=sub, **common), 2),
      out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype),
                f32((b, num_kv_heads, tp))),
      scratch_types=(
          smem((BLOCK, h), dtype, sub), smem((BLOCK, h), dtype, sub),  # k (then dk), v (then dv)
          smem((nb, BLOCK, h), dtype, sub), smem((nb, BLOCK, h), dtype, sub),  # q, do rings
          plgpu.SMEM((nb, 2, BLOCK), jnp.float32),  # (stick, prefix) ring
          plgpu.SMEM((nb, BLOCK), jnp.float32),  # drem ring
          smem((BLOCK, sub), jnp.bfloat16, sub), smem((BLOCK, sub), jnp.bfloat16, sub),  # triangles
          operand(jnp.bfloat16, sub),  # parts
          smem(_SHAPE, dtype, sub), smem(_SHAPE, dtype, sub),  # a, dz: transposed left operands
          plgpu.SMEM((BLOCK,), jnp.float32),  # dgate
          (plgpu.Barrier(num_barriers=2),) + (plgpu.Barrier(num_barriers=nb),) * 4,
      ),
      grid=(nq, num_kv_heads, b), grid_names=("k", "heads", "batch"), kernel_name=DKV_NAME,
      **params,
  )(scale_rows, row_end, *given, q, k, v, d_out, d_rem, records)
  dscale = jnp.sum(dscale[:, :, :t]).reshape(1)
  dgate = None if forget_gate is None else dgate[:, :, :t].transpose(0, 2, 1)
  return dq[:, :t], dk[:, :t], dv[:, :t], dscale, dgate
