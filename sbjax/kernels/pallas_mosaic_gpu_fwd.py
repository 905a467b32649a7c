"""Forward Pallas Mosaic GPU kernel (Hopper): one program per (query block, head, batch).

Two structures (``MosaicBlockSizes.num_compute_warpgroups``; docs/design.md §6):

- 1: one warpgroup, 64 query rows, that issues the TMA copies of its K/V ring itself, the next
  tile's copy before the current tile's math;
- 2: FlashAttention-3's structure: two consumer warpgroups of 64 rows share the K/V tiles that a
  producer warpgroup loads into the ring ("consumed" barriers free a slot).

Per key block a consumer runs three wgmma (fp32 accumulators; the left operands of the last two
in registers on the GPU, through shared memory in interpret mode):

    x   = q @ k^T                      [block_q, block_k]
    sum = part(log2(1 - beta)) @ tri   [block_q, block_k]  (in-block sums of the nearer keys)
    acc = acc + a @ v                  [block_q, H]

FlashAttention-3's scheduling, opt-in (``MosaicBlockSizes``; timings in docs/design.md §6):
``pipeline_qk`` issues the next block's ``q k^T`` before this block's softplus;
``schedule_barrier`` makes the two consumers take turns on the tensor cores;
``accumulate_in_place`` accumulates ``a @ v`` in the tensor cores' accumulator (GPU only).

Key blocks are walked from the diagonal leftwards (nearest first), the row's log2-stick carried
in fp32, as the Triton forward (``pallas_triton_fwd``) does; only the diagonal blocks are masked
(every block with ``segment_ids``). The walk ends once every row's stick is used up (below
2^-152, exactly, or ``skip_tolerance``; ``MosaicBlockSizes.skip_used_stick``): the one-warpgroup
kernel tests its own rows, the two-warpgroup kernel's producer decides for both consumers. An
optional forget gate scales each key's ``beta``. T that is not a multiple of the rows per
program is padded by the launcher (zeros, so the padding is finite; padded keys lie after every
real query and the causal mask hides them). ``causal=False`` is the fully visible cross-chunk
mode of context parallelism (as ``pallas_triton_fwd``'s): the same walk over every key block of
an earlier chunk, from its last key, only the partial last block (or every tile, with segments)
masked.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from sbjax.common import stop_log2
from sbjax.kernels import pallas_mosaic_gpu_tiles as tiles
from sbjax.kernels.pallas_mosaic_gpu_config import PRODUCER_REGISTERS, MosaicBlockSizes

NAME = "stick_breaking_fwd_mosaic_gpu"


def _meet(barrier):
  """Both consumers arrive, then wait: FA3's scheduling rendezvous."""
  plgpu.barrier_arrive(barrier)
  plgpu.barrier_wait(barrier)


def _walk(q_smem, k_smem, v_smem, tri_smem, part_smem, p_smem, k_ready, v_ready, *, scale_ref,
          seg_ref, gate_ref, q_start, n_full, n_total, block_k, num_buffers, lag, cumsum_parts,
          registers, pipeline_qk=False, schedule=None, in_place=False, before_tile=None,
          k_done=None, v_done=None, goes_on=None, report=None, seq_len=None, cross=None):
  """One warpgroup's walk over key-block steps ``t = 0 .. n_total - 1`` (key block
  ``n_total - 1 - t``, in slot ``t % num_buffers``): ``(acc [Q, H], log_stick [Q], steps)`` in
  fp32, ``steps`` the number of steps walked.

  ``goes_on(step, log_stick)``: None (every step is walked), or the skipping rule: it waits for
  K of step ``step + 1`` if the walk goes on to it and returns whether it does (a traced bool;
  ``log_stick`` is the rows' stick before step ``step`` with ``pipeline_qk``, after it without),
  so the walk may end before ``n_total``. ``report(step, log_stick)`` runs after each step's
  stick update, before ``v_done``. Both see the rows past ``seq_len`` (the padding; None: none)
  at -inf.

  ``seg_ref``: this batch row's segment ids ``[T]`` int32 in GMEM, or None; with them every
  tile is masked (keys of another segment can lie in any block). ``cross``: None (causal), or
  the cross-chunk mode's ``(num_keys, key_seg_offset)`` (``tiles.cross_chunk``): every real key
  visible (the masked tiles: the last, partial, key block, or every tile with segments), the
  keys' ids from ``key_seg_offset`` in ``seg_ref``. ``gate_ref``: this batch row
  and kv head's forget-gate logits ``[T]`` fp32 in GMEM, or None.
  ``k_ready``/``v_ready``: the slots' load barriers. ``before_tile(t)`` runs first in a step (the
  one-warpgroup kernel's prefetch); ``k_done(slot)``/``v_done(slot)`` after the last read of a
  step's K/V (the two-warpgroup kernel's "consumed" arrivals). ``registers``: the left operands
  of the stick-sum and ``a @ v`` wgmma stay in registers (no SMEM round trip and async-proxy
  fence); else they go through ``part_smem``/``p_smem`` (what interpret mode can run).
  ``pipeline_qk``: step t issues step t + 1's ``q k^T`` before its own stick terms and carries
  the logits (the last step recomputes its own, discarded, so that every step has the same
  shape). ``schedule``: the ping-pong barrier both consumers meet (FA3's placement: after the
  ``q k^T`` issue, and before the ``a @ v`` issue). ``in_place``: ``a @ v`` accumulates into
  ``acc`` on the tensor cores (``pl.run_state``, which interpret mode cannot run).
  """
  block_q, head_dim = q_smem.shape
  shape = (block_q, block_k)
  # [block_q]: the scale in every row. An optimized (vectorised) load from GMEM does not lower.
  scale2 = plgpu.load(scale_ref, layout=tiles.ROW, optimized=False) * tiles.LOG2E
  nothing = lambda *_: None
  before_tile, k_done, v_done = (f or nothing for f in (before_tile, k_done, v_done))
  slot_of = lambda step: lax.rem(step, jnp.int32(num_buffers))
  padding = tiles.padding_rows(q_start, block_q, seq_len)
  if seg_ref is not None:  # [block_q] int32: the rows' segments (non-vectorised GMEM loads)
    q_seg = plgpu.load(seg_ref.at[pl.ds(q_start, block_q)], layout=tiles.ROW, optimized=False)

  def meet():
    if schedule is not None:
      _meet(schedule)

  def issue_logits(s_ref, step):  # asynchronous: s_ref[...] waits for it
    plgpu.wgmma(s_ref, q_smem, k_smem.at[slot_of(step)].T)  # [block_q, block_k]

  def read_logits(s_ref):  # base-2 logits [block_q, block_k]
    return s_ref[...] * tiles.row_bcast(scale2, shape)

  def logits(step, *, rendezvous: bool):  # issued, then waited for
    def body(s_ref):
      issue_logits(s_ref, step)
      if rendezvous:
        meet()
      return read_logits(s_ref)
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

  def stick_terms(x, mask, gate):
    """``(log2 beta, log2(1 - beta), nearer)``: ``nearer`` the in-block sums of log2(1 - beta)
    over the nearer keys, in bf16 parts (hi + lo + ...) each multiplied by the triangle on the
    tensor cores."""
    log_beta, log_1m_beta = tiles.stick_terms(x, gate)
    if mask is not None:
      log_1m_beta = jnp.where(mask, log_1m_beta, 0.0)
    nearer = tiles.in_block_sums(log_1m_beta, tri_smem, parts=cumsum_parts, smem=part_smem,
                                 registers=registers)
    return log_beta, log_1m_beta, nearer

  def wait_next(step, log_stick):  # K of step + 1 waited for when the walk goes on to it
    exists = step + 1 < n_total
    if goes_on is None:
      pl.when(exists)(lambda: plgpu.barrier_wait(k_ready.at[slot_of(step + 1)]))
      return exists
    return goes_on(step, tiles.live(log_stick, padding))

  def tile(step, carry, *, masked):
    acc, log_stick, x = carry  # [block_q, H], [block_q] fp32; x: this step's logits if pipelined
    before_tile(step)
    slot = slot_of(step)
    mask = None
    if masked:
      mask = tiles.visible(q_start, tiles.step_keys(step, n_total, block_k).start,
                           None if seg_ref is None else q_seg, seg_ref, lag=lag, shape=shape,
                           cross=cross)
    gate = None
    if gate_ref is not None:
      gate = tiles.key_gate(gate_ref.at[tiles.step_keys(step, n_total, block_k)], shape)
    if pipeline_qk:
      has_next = wait_next(step, log_stick)
      # The last step recomputes its own logits (its K slot is intact), discarded, so that every
      # step has the same shape.
      nxt = jnp.where(has_next, step + 1, step)

      def overlapped(s_ref):
        issue_logits(s_ref, nxt)  # on the tensor cores while the softplus below runs
        meet()
        # The triangle wgmma's read waits for the next logits too (wgmma groups retire in
        # order); by then they are done.
        return stick_terms(x, mask, gate), read_logits(s_ref)

      (log_beta, log_1m_beta, nearer), x_next = pl.run_scoped(
          overlapped, plgpu.ACC(shape, jnp.float32))
      pl.when(has_next)(lambda: k_done(slot_of(nxt)))
    else:  # K of this step was waited for by the previous step (or before the walk)
      x, x_next = logits(step, rendezvous=True), None
      k_done(slot)
      log_beta, log_1m_beta, nearer = stick_terms(x, mask, gate)
    a = jnp.exp2(log_beta + nearer + tiles.row_bcast(log_stick, shape))  # [block_q, block_k]
    if masked:
      a = jnp.where(mask, a, 0.0)

    p = tiles.lhs(a.astype(q_smem.dtype), p_smem, registers)
    if schedule is not None:
      plgpu.barrier_arrive(schedule)  # done with the elementwise work
    plgpu.barrier_wait(v_ready.at[slot])
    if schedule is not None:
      plgpu.barrier_wait(schedule)  # the other consumer is off the tensor cores
    if in_place:
      acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem.at[slot]))(
          plgpu.ACC.init(acc))  # [block_q, H]
    else:
      acc = acc + tiles.matmul(p, v_smem.at[slot], acc.shape)  # [block_q, H]
    log_stick_next = log_stick + jnp.sum(log_1m_beta, axis=1)
    if report is not None:
      report(step, tiles.live(log_stick_next, padding))
    v_done(slot)
    if not pipeline_qk:
      has_next = wait_next(step, log_stick_next)
    return (acc, log_stick_next, x_next), has_next

  acc = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
  log_stick = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32), tiles.ROW)
  x = None
  plgpu.barrier_wait(k_ready.at[0])
  if pipeline_qk:  # the first step's logits, before the loop
    x = logits(jnp.int32(0), rendezvous=False)
    k_done(jnp.int32(0))
  # The diagonal blocks come first; with segments, every block is masked.
  n_masked = n_total if seg_ref is not None else n_total - n_full
  carry = (acc, log_stick, x)
  if goes_on is None:  # every step: fori_loops
    for masked, lo, hi in ((True, 0, n_masked), (False, n_masked, n_total)):
      body = functools.partial(tile, masked=masked)
      carry = lax.fori_loop(lo, hi, lambda t, c, body=body: body(t, c)[0], carry)
    steps = n_total
  else:  # until the walk ends: while_loops
    state = (jnp.int32(0), jnp.bool_(True), carry)
    for masked, hi in ((True, n_masked), (False, n_total)):
      def step_once(state, masked=masked):
        step, _, carry = state
        carry, has_next = tile(step, carry, masked=masked)
        return step + 1, has_next, carry
      state = lax.while_loop(lambda st, hi=hi: st[1] & (st[0] < hi), step_once, state)
    steps, _, carry = state
  acc, log_stick, _ = carry
  return acc, log_stick, steps


def _store(acc, log_stick, o_smem, rem_smem, out_ref, rem_ref):
  o_smem[...] = acc.astype(o_smem.dtype)
  rem_smem[...] = jnp.exp2(log_stick)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, out_ref)
  plgpu.copy_smem_to_gmem(rem_smem, rem_ref)
  plgpu.wait_smem_to_gmem(0)


def _fwd_kernel(scale_ref, seg_ref, gate_ref, q_ref, k_ref, v_ref, out_ref, rem_ref, *scratch,
                block_q, block_k, num_buffers, group, attend_current, cumsum_parts, registers,
                pipeline_qk, schedule_barrier, in_place, consumer_registers, num_q_blocks,
                heavy_first, stop, seq_len, cross):
  """One warpgroup: it issues the TMA copies of the ring itself, ``num_buffers - 1`` ahead, and
  with ``stop`` (a log2-stick, or None) ends its walk once every row's stick is below it (the
  test sees the stick before a step: one step late). ``cross``: None (causal), or the
  cross-chunk mode's ``(num_keys, key_seg_offset)`` (``tiles.cross_chunk``)."""
  q_smem, k_smem, v_smem, tri_smem, part_smem, p_smem, rem_smem, barriers = scratch
  q_barrier, k_barriers, v_barriers = barriers
  q_block, head, batch = tiles.program_ids(num_q_blocks, heavy_first)
  kv_head = lax.div(head, jnp.array(group, head.dtype))
  q_start = q_block * block_q
  rows = (batch, pl.ds(q_start, block_q), head)
  plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_barrier)
  lag = 0 if attend_current else 1
  n_full, n_total = tiles.key_blocks(q_start, block_q, block_k=block_k, lag=lag, cross=cross)

  fetch = tiles.kv_ring_fetch(k_ref, v_ref, k_smem, v_smem, k_barriers, v_barriers, batch=batch,
                              kv_head=kv_head, n_total=n_total, block_k=block_k,
                              num_buffers=num_buffers)
  tiles.prefetch_first(fetch, n_total, num_buffers)

  del schedule_barrier, consumer_registers  # one warpgroup: nothing to order or to share

  def prefetch(step):
    # The slot this copy overwrites holds step - 1, whose reads are over (its own wgmmas and,
    # with pipeline_qk, step - 2's read of its K) and complete.
    nxt = step + num_buffers - 1
    pl.when(nxt < n_total)(functools.partial(fetch, nxt))

  goes_on = None
  if stop is not None:
    def goes_on(step, log_stick):  # until every row's stick is used up
      has_next = (step + 1 < n_total) & (jnp.max(log_stick) > stop)
      slot = lax.rem(step + 1, jnp.int32(num_buffers))
      pl.when(has_next)(lambda: plgpu.barrier_wait(k_barriers.at[slot]))
      return has_next

  tiles.build_triangle(tri_smem)
  plgpu.barrier_wait(q_barrier)
  acc, log_stick, steps = _walk(
      q_smem, k_smem, v_smem, tri_smem, part_smem, p_smem, k_barriers, v_barriers,
      scale_ref=scale_ref, seg_ref=None if seg_ref is None else seg_ref.at[batch],
      gate_ref=None if gate_ref is None else gate_ref.at[batch, kv_head], q_start=q_start,
      n_full=n_full, n_total=n_total, block_k=block_k,
      num_buffers=num_buffers, lag=lag, cumsum_parts=cumsum_parts, registers=registers,
      pipeline_qk=pipeline_qk, in_place=in_place, before_tile=prefetch, goes_on=goes_on,
      seq_len=seq_len, cross=cross)
  if stop is not None:
    tiles.drain_ring(steps, n_total, num_buffers, k_barriers, v_barriers)
  # q is no longer read: its buffer stages the output.
  _store(acc, log_stick, q_smem, rem_smem, out_ref.at[rows],
         rem_ref.at[batch, head, pl.ds(q_start, block_q)])


def _fwd_kernel_ws(scale_ref, seg_ref, gate_ref, q_ref, k_ref, v_ref, out_ref, rem_ref, *scratch,
                   block_q, block_k, num_buffers, group, attend_current, cumsum_parts, registers,
                   pipeline_qk, schedule_barrier, in_place, consumer_registers, num_q_blocks,
                   heavy_first, stop, seq_len, cross):
  """Warp-specialised (FA3's structure): warpgroups 0 and 1 each compute ``block_q`` rows of a
  ``2 * block_q`` query block; warpgroup 2 issues the TMA copies of the K/V ring, which both
  consumers read, refilling a slot once both have arrived on its "consumed" barrier.

  Both consumers walk the key blocks of the upper rows (``n_total``); the lower rows' extra
  diagonal step is fully masked (weights 0, stick unchanged), which keeps every barrier's phases
  the same in both consumers at the cost of one tile per program.

  With ``stop`` (a log2-stick, or None) the producer ends the walk for both consumers
  (``tiles.produce_kv_ring``): ``num_buffers + 1`` steps after the later consumer's stick ran out.
  """
  (q_smem, k_smem, v_smem, tri_smem, part_smem, p_smem, rem_smem, barriers, consumed,
   tri_barrier, schedule, skip_scratch) = scratch
  q_barriers, k_barriers, v_barriers = barriers
  k_consumed, v_consumed = consumed
  q_block, head, batch = tiles.program_ids(num_q_blocks, heavy_first)
  wg = lax.axis_index("wg")
  # Computed in each warpgroup's branch: computed once out here, before the branches, it makes
  # the Mosaic GPU interpreter (JAX 0.11.2) hang on the next kernel of the same process.
  kv_head = lambda: lax.div(head, jnp.array(group, head.dtype))
  lag = 0 if attend_current else 1
  _, n_total = tiles.key_blocks(q_block * 2 * block_q, 2 * block_q, block_k=block_k, lag=lag,
                                cross=cross)

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(consumer_registers, action="increase")
    q_start = q_block * 2 * block_q + wg * block_q
    rows = (batch, pl.ds(q_start, block_q), head)
    q_wg = q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_wg, q_barriers.at[wg])
    n_full, _ = tiles.key_blocks(q_start, block_q, block_k=block_k, lag=lag, cross=cross)

    @pl.when(wg == 0)  # one triangle for both consumers (SMEM is short at block_k = 128)
    def _():
      tiles.build_triangle(tri_smem)
      plgpu.barrier_arrive(tri_barrier)

    plgpu.barrier_wait(tri_barrier)
    plgpu.barrier_wait(q_barriers.at[wg])
    if schedule_barrier:  # consumer 1 one rendezvous behind consumer 0 (FA3): they alternate
      pl.when(wg == 1)(functools.partial(_meet, schedule))
    goes_on = report = None
    if stop is not None:
      report, goes_on_next = tiles.consumer_skipping(
          skip_scratch, k_barriers, consumer=wg, n_total=n_total, num_buffers=num_buffers)
      goes_on = lambda step, log_stick: goes_on_next(step)  # the producer decides

    acc, log_stick, _ = _walk(
        q_wg, k_smem, v_smem, tri_smem, *(None if r is None else r.at[wg]
                                                 for r in (part_smem, p_smem)), k_barriers,
        v_barriers, scale_ref=scale_ref, seg_ref=None if seg_ref is None else seg_ref.at[batch],
        gate_ref=None if gate_ref is None else gate_ref.at[batch, kv_head()], q_start=q_start,
        n_full=jnp.minimum(n_full, n_total),
        n_total=n_total, block_k=block_k, num_buffers=num_buffers, lag=lag,
        cumsum_parts=cumsum_parts, registers=registers, pipeline_qk=pipeline_qk,
        schedule=schedule if schedule_barrier else None, in_place=in_place,
        k_done=lambda slot: plgpu.barrier_arrive(k_consumed.at[slot]),
        v_done=lambda slot: plgpu.barrier_arrive(v_consumed.at[slot]), goes_on=goes_on,
        report=report, seq_len=seq_len, cross=cross)
    if schedule_barrier:  # consumer 1's first rendezvous, matched
      pl.when(wg == 0)(functools.partial(_meet, schedule))
    _store(acc, log_stick, q_wg, rem_smem.at[wg], out_ref.at[rows],
           rem_ref.at[batch, head, pl.ds(q_start, block_q)])

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(PRODUCER_REGISTERS[consumer_registers], action="decrease")
    tiles.produce_kv_ring(k_ref, v_ref, k_smem, v_smem, k_barriers, v_barriers, k_consumed,
                          v_consumed, batch=batch, kv_head=kv_head(), n_total=n_total,
                          block_k=block_k, num_buffers=num_buffers, stop=stop,
                          skip_scratch=skip_scratch)


def forward(q, k, v, scale, segment_ids=None, forget_gate=None, *, attend_current: bool,
            block_sizes: MosaicBlockSizes, skip_tolerance: float = 0.0, interpret=False,
            causal: bool = True, key_segment_ids=None):
  """Launches the forward kernel.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]``; bf16 or fp16, H in {64, 128}, any T.
    scale: ``[1]`` float32 (traced).
    segment_ids: ``[B, T]`` int32 or None; keys of another segment are invisible.
    causal: False is the fully visible cross-chunk mode of context parallelism: every key of an
      earlier chunk (of the queries' length) is visible, the stick broken from its last key
      (``attend_current`` ignored); ``key_segment_ids [B, T]`` int32 are then the keys' ids,
      given with ``segment_ids``.
    forget_gate: ``[B, T, K]`` float32 logits or None (``beta_ji = sigmoid(g_i) sigmoid(z_ji)``).
    skip_tolerance: 0 (exact skipping) or the stick below which a query block stops walking
      (with ``block_sizes.skip_used_stick``; see ``sbjax.stick_breaking_attention``).
    interpret: False, or ``plgpu.InterpretGPUParams()`` for Mosaic GPU interpret mode (CPU).

  Returns:
    ``(out [B, T, N, H] in q.dtype, rem [B, N, T] float32)``.
  """
  b, t, n, h = q.shape
  group = n // k.shape[2]
  bq, bk, nb = block_sizes.block_q, block_sizes.block_k, block_sizes.num_buffers
  wgs = block_sizes.num_compute_warpgroups
  rows = wgs * bq  # query rows per program
  tp = tiles.cdiv(t, math.lcm(rows, bk)) * math.lcm(rows, bk)
  # Zeros: finite padding. Padded rows are discarded; padded keys follow every real query, so
  # the causal mask hides them (the cross-chunk mode masks them).
  q, k, v, segment_ids, forget_gate, key_segment_ids = (
      tiles.pad_time(x, tp) for x in (q, k, v, segment_ids, forget_gate, key_segment_ids))
  cross = None
  if not causal:
    segment_ids, cross = tiles.cross_chunk(segment_ids, key_segment_ids, t)
  dtype = q.dtype
  skip = block_sizes.skip_used_stick
  # 64 bf16/fp16 elements are one 128-byte row: the widest swizzle, which wgmma reads best.
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  per_wg = (lambda shape: shape) if wgs == 1 else (lambda shape: (wgs, *shape))
  # Interpret mode reads both wgmma operands from SMEM and cannot run pl.run_state (so it adds
  # a @ v to acc in registers); the values are the same either way, up to fp32 rounding.
  registers = block_sizes.operands_in_registers and not interpret
  smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=transforms)
  scratch = [
      smem(per_wg((bq, h)), dtype),  # q, then the output
      smem((nb, bk, h), dtype),  # k ring
      smem((nb, bk, h), dtype),  # v ring
      smem((bk, bk), jnp.bfloat16),  # triangle
      None if registers else smem(per_wg((bq, bk)), jnp.bfloat16),  # a part of log2(1 - beta)
      None if registers else smem(per_wg((bq, bk)), dtype),  # weights a
      plgpu.SMEM(per_wg((bq,)), jnp.float32),  # rem
      (plgpu.Barrier(num_barriers=wgs), plgpu.Barrier(num_barriers=nb),
       plgpu.Barrier(num_barriers=nb)),  # q, k and v loaded
  ]
  if wgs == 1:
    kernel, threads = _fwd_kernel, {}
  else:  # K/V slots read by both consumers
    scratch.append((plgpu.Barrier(num_arrivals=wgs, num_barriers=nb),) * 2)
    scratch.append(plgpu.Barrier(num_barriers=1))  # the triangle is built
    scratch.append(plgpu.Barrier(num_arrivals=wgs))  # the consumers' schedule (ping-pong)
    scratch.append((plgpu.SMEM((wgs, nb + 1, bq), jnp.float32),  # the consumers' sticks
                    plgpu.SMEM((nb,), jnp.int32)) if skip else None)  # go flags, per K slot
    kernel, threads = _fwd_kernel_ws, dict(num_threads=wgs + 1, thread_name="wg")
  kernel = functools.partial(
      kernel, block_q=bq, block_k=bk, num_buffers=nb, group=group,
      attend_current=attend_current, cumsum_parts=tiles.cumsum_parts(dtype), registers=registers,
      pipeline_qk=block_sizes.pipeline_qk, schedule_barrier=block_sizes.schedule_barrier,
      in_place=block_sizes.accumulate_in_place and not interpret,
      consumer_registers=block_sizes.consumer_registers, num_q_blocks=tp // rows,
      heavy_first=block_sizes.heavy_first, stop=stop_log2(skip_tolerance) if skip else None,
      seq_len=t if tp != t else None, cross=cross)
  given, with_optional = tiles.optional_inputs(segment_ids, forget_gate)
  scale_rows = jnp.broadcast_to(jnp.reshape(scale, ()).astype(jnp.float32), (bq,))
  out, rem = plgpu.kernel(
      with_optional(kernel, 1),
      out_type=(jax.ShapeDtypeStruct((b, tp, n, h), dtype),
                jax.ShapeDtypeStruct((b, n, tp), jnp.float32)),
      scratch_types=tuple(scratch),
      grid=(tp // rows, n, b),
      grid_names=("q", "heads", "batch"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret,
      kernel_name=NAME,
      **threads,
  )(scale_rows, *given, q, k, v)
  return out[:, :t], rem[:, :, :t]
