"""Tile math and walk geometry shared by the Pallas Mosaic GPU forward and backward kernels.

Logits are in base 2 (``x = z * log2(e)``), as in the Triton kernels (``pallas_triton_tiles``),
whose constants and formulas these restate so that the backends stay independent.
"""

from __future__ import annotations

import functools
import math

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

LOG2E = math.log2(math.e)
# softplus(z) = z above 15 nats, clamped at 2^20 (base 2): the constants and reasons of
# pallas_triton_tiles (SOFTPLUS_CUT, SOFTPLUS_MAX), restated here so backends stay independent.
SOFTPLUS_CUT = 15.0 * LOG2E
SOFTPLUS_MAX = 2.0**20

ROW = plgpu.Layout.WGMMA.reduce(1)  # a [block_q] vector laid out like the rows of a wgmma tile
COL = plgpu.Layout.WGMMA.reduce(0)  # a [block_k] vector laid out like the columns of one


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def row_bcast(x, shape):
  """``x [Q]`` (row layout) broadcast along the keys to ``shape [Q, S]``."""
  return lax.broadcast_in_dim(x, shape, [0])


def softplus2(x):
  """``log2(1 + 2^x)``, cut above ``SOFTPLUS_CUT`` (``pallas_triton_tiles.stick_terms``'s jnp
  branch)."""
  return jnp.where(x > SOFTPLUS_CUT, x, jnp.log2(1.0 + jnp.exp2(x)))


def sigmoid_terms(x):
  """``(log2 s, log2(1 - s))``, ``s = sigmoid`` of base-2 logits ``x`` (see
  ``pallas_triton_tiles.stick_terms``; the softplus clamped at ``SOFTPLUS_MAX``).

  Above the cut ``log2 s`` is 0 by selection, not as ``x - sp = x - x``: compiled, ``x = qk *
  scale2`` may be fused into that subtraction (NVPTX contracts multiplies into FMAs), which then
  returns the product's rounding error, up to 2^-12 at |x| ~ 5000, so that ``s = 1 - 1.7e-4``
  where the backward needs exactly 1 (``dz = G - s (P + G)`` cancels to 0 there, and ``dscale``
  weighs ``dz`` by ``q . k`` ~ 1e4)."""
  sp = jnp.minimum(softplus2(x), SOFTPLUS_MAX)
  return jnp.where(x > SOFTPLUS_CUT, 0.0, jnp.minimum(x - sp, 0.0)), -sp


def gated_terms(log_s, log_1m_s, gate):
  """``(log2 beta, log2(1 - beta))`` for ``beta = f s``; ``gate``: ``(log2 f, log2(1 - f))``,
  ``[Q, S]`` each: ``log2(1 - beta) = logaddexp2(log2(1 - f), log2 f + log2(1 - s))`` (every
  exponent <= 0)."""
  log_f, log_1mf = gate
  b = log_f + log_1m_s
  hi = jnp.maximum(log_1mf, b)
  return log_f + log_s, hi + jnp.log2(1.0 + jnp.exp2(jnp.minimum(log_1mf, b) - hi))


def stick_terms(x, gate=None):
  """``(log2 beta, log2(1 - beta))`` of base-2 logits ``x``, gated when ``gate`` is given (see
  ``gated_terms``)."""
  log_s, log_1m_s = sigmoid_terms(x)
  return (log_s, log_1m_s) if gate is None else gated_terms(log_s, log_1m_s, gate)


def key_gate(gate_ref, shape):
  """``(log2 f, log2(1 - f))`` broadcast to ``shape [Q, S]`` from a tile's gate logits
  ``gate_ref [S]`` (natural log, fp32, GMEM): not clamped, so ``g = +inf`` gives the ungated
  stick exactly and ``g = -inf`` a key that takes nothing."""
  g = plgpu.load(gate_ref, layout=COL, optimized=False) * LOG2E  # [block_k]
  cols = lambda x: lax.broadcast_in_dim(x, shape, [1])
  return cols(-softplus2(-g)), cols(-softplus2(g))


def build_triangle(tri_smem, keep=lambda m, i: m > i):
  """``tri [S, S]`` bf16 in SMEM with ``tri[m, i] = keep(m, i)``: ``(x @ tri)[r, i]`` sums
  ``x[r, m]`` over the keys ``m`` that ``keep`` pairs with ``i`` (by default ``m > i``: the nearer
  keys of a tile). Mosaic GPU has no cumsum lowering, so in-block cumulative sums are wgmma
  against such matrices."""
  # [S, S]; for S < 64 keys a [64, S] buffer whose first S rows are the triangle (a WGMMA-layout
  # value has a multiple of 64 rows).
  shape = tri_smem.shape
  m_ids = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  i_ids = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  tri_smem[...] = keep(m_ids, i_ids).astype(jnp.bfloat16)
  plgpu.commit_smem()  # register stores, then a wgmma (async proxy) reads them


def padding_rows(q_start, rows: int, seq_len):
  """``[rows]`` fp32 (row layout): 0 for the rows before ``seq_len``, -inf for the launcher's
  padding after it; None when ``seq_len`` is None (no padding). Built from a 2-D iota reduced
  along the keys: a 1-D row-layout iota defeats layout inference in the two-consumer kernel."""
  if seq_len is None:
    return None
  shape = (rows, 64)
  pos = q_start + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  return jnp.max(jnp.where(pos < seq_len, jnp.float32(0), jnp.float32(-jnp.inf)), axis=1)


def live(log_stick, padding):
  """``log_stick [Q]`` with the padded rows (``padding_rows``, or None: none) at -inf, for the
  skipping tests: padded rows of zeros meet an infinite key as ``0 * inf = NaN``, which must not
  decide when the real rows stop."""
  return log_stick if padding is None else jnp.where(padding == 0.0, log_stick, padding)


def key_blocks(q_start, rows: int, *, block_k: int, lag: int, cross=None):
  """``(n_full, n_total)`` for query rows ``[q_start, q_start + rows)``: key blocks ``[0, n_full)``
  are visible to every row, ``[n_full, n_total)`` need the causal mask. In the cross-chunk mode
  (``cross``, from ``cross_chunk``) every block with real keys, the last one masked if partial."""
  if cross is not None:
    num_keys = cross[0]
    return jnp.int32(num_keys // block_k), jnp.int32(cdiv(num_keys, block_k))
  first_last_key = q_start - lag  # the last key the first row sees
  n_total = lax.div(first_last_key + rows - 1 + block_k, jnp.int32(block_k))
  return jnp.minimum(lax.div(first_last_key + 1, jnp.int32(block_k)), n_total), n_total


def visible(q_start, k_start, q_seg, seg_ref, *, lag, shape, seq_len=None, cross=None):
  """``shape`` (``[rows, keys]``, WGMMA layout) bool for the rows from ``q_start`` and the keys
  from ``k_start``, shared by the forward and backward kernels: causal visibility (and equal
  segments, ``q_seg [rows]`` row layout, the keys' ids read from ``seg_ref``, or None), for the
  rows before ``seq_len`` (None: all). ``cross``: None, or the cross-chunk mode's ``(num_keys,
  key_seg_offset)``: the keys before ``num_keys`` are visible (the launcher's padded keys are
  not), their ids start at ``key_seg_offset`` in ``seg_ref``."""
  q_pos = q_start + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
  k_pos = k_start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  mask = k_pos <= q_pos - lag if cross is None else k_pos < cross[0]
  if seq_len is not None:
    mask = mask & (q_pos < seq_len)
  if q_seg is not None:
    k_first = k_start if cross is None else cross[1] + k_start
    k_seg = plgpu.load(seg_ref.at[pl.ds(k_first, shape[1])], layout=COL, optimized=False)
    mask = mask & (row_bcast(q_seg, shape) == lax.broadcast_in_dim(k_seg, shape, [1]))
  return mask


def step_keys(step, n_total, block_k: int):
  """The keys walk step ``step`` reads (nearest first): key block ``n_total - 1 - step``."""
  return pl.ds((n_total - 1 - step) * block_k, block_k)


def program_ids(num_q_blocks: int, heavy_first: bool):
  """``(q_block, head, batch)``. The grid's first axis, the query block, varies fastest, so the
  programs in flight share one head's K/V in L2; ``heavy_first`` reverses it so that the longest
  causal walks start first and the last wave holds the shortest."""
  q_block = lax.axis_index("q")
  if heavy_first:
    q_block = num_q_blocks - 1 - q_block
  return q_block, lax.axis_index("heads"), lax.axis_index("batch")


def cumsum_parts(dtype) -> int:
  """bf16 parts of the in-block sums: 1 for bf16, 2 for fp16 (``pallas_triton_tiles.cumsum_parts``
  gives the error analysis)."""
  return 2 if jnp.dtype(dtype) == jnp.float16 else 1


def matmul(a, b_smem, out_shape):
  """``a @ b_smem`` in a fresh fp32 accumulator, waited for; ``a`` an SMEM ref (optionally
  ``.T``) or a WGMMA-layout array in registers."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b_smem)
    return acc_ref[...]  # waits for every wgmma in flight
  return pl.run_scoped(body, plgpu.ACC(out_shape, jnp.float32))


def lhs(x, smem, registers: bool):
  """``x`` as a wgmma left operand: itself in registers, or stored to ``smem`` (what interpret
  mode can read)."""
  if registers:
    return x
  smem[...] = x
  plgpu.commit_smem()  # make the register stores visible to the wgmma (async proxy)
  return smem


def bf16_parts(x, parts: int):
  """``parts`` bf16 terms of fp32 ``x``, largest first (each the rounded residual of the ones
  before), whose sum keeps about ``8 * parts`` bits of ``x``: all 24 with 3."""
  terms = []
  for _ in range(parts):
    terms.append(x.astype(jnp.bfloat16))
    x = x - terms[-1].astype(jnp.float32)
  return terms


def in_block_sums(x, tri_smem, *, parts: int, smem, registers: bool):
  """``x @ tri`` for fp32 ``x [Q, S]``: in-block cumulative sums (``build_triangle``), with ``x``
  split into ``parts`` bf16 terms (hi + lo + ...) that keep about ``8 * parts`` bits, each
  multiplied in its own accumulator and the products added in fp32 registers, hi first, as the
  Triton kernels add theirs (not inside the tensor cores' accumulation). In registers the parts
  are issued together and waited for once; through ``smem`` (bf16 ``[Q, S]``) each is waited
  for before the next overwrites it."""
  terms = bf16_parts(x, parts)
  if registers:
    def body(*acc_refs):
      for acc_ref, term in zip(acc_refs, terms):
        plgpu.wgmma(acc_ref, term, tri_smem)
      products = [acc_ref[...] for acc_ref in acc_refs]
      return functools.reduce(lambda a, b: a + b, products)
    return pl.run_scoped(body, *[plgpu.ACC(x.shape, jnp.float32)] * parts)
  out = None
  for term in terms:
    y = matmul(lhs(term, smem, False), tri_smem, x.shape)
    out = y if out is None else out + y
  return out


def kv_ring_fetch(k_ref, v_ref, k_smem, v_smem, k_barriers, v_barriers, *, batch, kv_head,
                  n_total, block_k: int, num_buffers: int):
  """``fetch(step)``: the TMA copies of walk step ``step``'s K and V tiles (key block
  ``n_total - 1 - step``) into ring slot ``step % num_buffers``."""
  def fetch(step):
    slot = lax.rem(step, jnp.int32(num_buffers))
    keys = (batch, step_keys(step, n_total, block_k), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_barriers.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_barriers.at[slot])
  return fetch


def prefetch_first(fetch, total, num_buffers: int):
  """A ring's first ``num_buffers - 1`` copies (of ``total`` steps)."""
  for step in range(num_buffers - 1):
    pl.when(step < total)(functools.partial(fetch, jnp.int32(step)))


def drain_ring(steps, total, num_buffers: int, *barriers):
  """After a walk that ended at ``steps`` (of ``total``): waits for the copies prefetched past
  its end (``num_buffers - 1`` ahead), so that they land before the kernel exits."""
  @pl.loop(steps, jnp.minimum(steps + num_buffers - 1, total))
  def _(step):
    slot = lax.rem(step, jnp.int32(num_buffers))
    for ready in barriers:
      plgpu.barrier_wait(ready.at[slot])


def produce_kv_ring(k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_consumed, v_consumed, *,
                    batch, kv_head, n_total, block_k: int, num_buffers: int, stop,
                    skip_scratch):
  """The producer warpgroup of a two-consumer kernel (FA3's structure): loads walk step ``t``'s
  K and V tiles (key block ``n_total - 1 - t``) into slot ``t % num_buffers`` once both consumers
  have arrived on the slot's "consumed" barriers for its previous tile.

  With ``stop`` (a log2-stick, or None) it ends the walk: each consumer writes its rows' stick
  after step t to ``skip_scratch[0]`` at ``[consumer, t % (num_buffers + 1)]``
  (``consumer_skipping``'s ``report``) before its "V consumed" arrival; before loading step u the
  producer reads step ``u - 1 - num_buffers``'s (ordered by the arrival it waited for at step
  u - 1, and not yet overwritten: that needs step u's tiles) and, if both are below ``stop``,
  writes 0 to step u's go flag (``skip_scratch[1]``, an int32 per K slot) and arrives on its K
  barrier without a copy. Consumers read the go flag once that barrier completes
  (``consumer_skipping``'s ``goes_on``): all three see the same end, ``num_buffers + 1`` steps
  after the later consumer's stick ran out. Finally it observes the last tiles' consumption, so
  that every barrier ends with no phase unobserved (interpret mode checks this when the
  barriers are freed)."""
  def load(step, slot, ref, smem, ready):
    plgpu.copy_gmem_to_smem(ref.at[batch, step_keys(step, n_total, block_k), kv_head],
                            smem.at[slot], ready.at[slot])

  def wait_consumed(step, slot, consumed):  # the slot's previous tile read by both consumers
    pl.when(step >= num_buffers)(lambda: plgpu.barrier_wait(consumed.at[slot]))

  if stop is None:
    @pl.loop(0, n_total)
    def _(step):
      slot = lax.rem(step, jnp.int32(num_buffers))
      wait_consumed(step, slot, k_consumed)
      load(step, slot, k_ref, k_smem, k_ready)
      wait_consumed(step, slot, v_consumed)
      load(step, slot, v_ref, v_smem, v_ready)
    steps, k_unseen = n_total, n_total - num_buffers  # steps loaded; first "K consumed" unseen
  else:
    stick_smem, go_smem = skip_scratch

    def used_up(step):  # both consumers' sticks after step - 1 - num_buffers
      ring = lax.rem(step - 1 - num_buffers, jnp.int32(num_buffers + 1))
      sticks = [plgpu.load(stick_smem.at[c, ring], layout=ROW, optimized=False)
                for c in range(2)]
      return jnp.max(jnp.maximum(*sticks)) <= stop

    def produce(state):
      step, _ = state
      slot = lax.rem(step, jnp.int32(num_buffers))
      wait_consumed(step, slot, k_consumed)
      ends = lax.cond(step > num_buffers, used_up, lambda _: jnp.bool_(False), step)
      go_smem[slot] = jnp.where(ends, 0, 1).astype(jnp.int32)
      pl.when(ends)(lambda: plgpu.barrier_arrive(k_ready.at[slot]))  # no copy: the end

      @pl.when(~ends)
      def _():
        load(step, slot, k_ref, k_smem, k_ready)
        wait_consumed(step, slot, v_consumed)
        load(step, slot, v_ref, v_smem, v_ready)
      return jnp.where(ends, step, step + 1), ends

    steps, ended = lax.while_loop(lambda st: (st[0] < n_total) & ~st[1], produce,
                                  (jnp.int32(0), jnp.bool_(False)))
    k_unseen = jnp.where(ended, steps - num_buffers + 1, steps - num_buffers)

  @pl.loop(jnp.maximum(k_unseen, 0), steps)
  def _(step):
    plgpu.barrier_wait(k_consumed.at[lax.rem(step, jnp.int32(num_buffers))])

  @pl.loop(jnp.maximum(steps - num_buffers, 0), steps)
  def _(step):
    plgpu.barrier_wait(v_consumed.at[lax.rem(step, jnp.int32(num_buffers))])


def consumer_skipping(skip_scratch, k_ready, *, consumer, n_total, num_buffers: int):
  """``(report, goes_on)`` of a consumer of ``produce_kv_ring`` with ``stop``:
  ``report(step, log_stick)`` stores its rows' stick after ``step`` for the producer;
  ``goes_on(step)`` waits for K of step ``step + 1`` if that step exists and returns whether the
  walk goes on to it (the producer's go flag)."""
  stick_smem, go_smem = skip_scratch

  def report(step, log_stick):
    stick_smem.at[consumer, lax.rem(step, jnp.int32(num_buffers + 1))][...] = log_stick

  def goes_on(step):
    slot = lax.rem(step + 1, jnp.int32(num_buffers))
    exists = step + 1 < n_total
    pl.when(exists)(lambda: plgpu.barrier_wait(k_ready.at[slot]))
    return exists & (go_smem[slot] != 0)
  return report, goes_on


def cross_chunk(segment_ids, key_segment_ids, num_keys: int):
  """The kernels' cross-chunk mode (``causal=False``) from padded ``[B, T_pad]`` segment ids (or
  None): ``(segment_ids, cross)``, the ids as one ``[B, 2 T_pad]`` row (the queries', then the
  keys') and ``cross = (num_keys, key_seg_offset)``, the real keys and where their ids start."""
  if segment_ids is None:
    return None, (num_keys, 0)
  return (jnp.concatenate([segment_ids, key_segment_ids], axis=1),
          (num_keys, segment_ids.shape[1]))


def pad_time(x, padded: int, axis: int = 1):
  """``x`` zero-padded along ``axis`` to ``padded`` positions (None stays None)."""
  if x is None or x.shape[axis] == padded:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, padded - x.shape[axis])
  return jnp.pad(x, widths)


def optional_inputs(segment_ids, forget_gate):
  """``(given, with_optional)`` for the kernels' optional inputs: segment ids ``[B, T]`` int32
  and the gate as ``[B, K, T]`` fp32 (a contiguous row per kv head). ``given``: the arrays to
  pass, after the kernel's ``num_leading`` leading inputs; ``with_optional(kernel,
  num_leading)``: the kernel body, which gets ``(seg_ref or None, gate_ref or None)`` there."""
  optional = (None if segment_ids is None else segment_ids.astype(jnp.int32),
              None if forget_gate is None else forget_gate.astype(jnp.float32).transpose(0, 2, 1))
  given = [x for x in optional if x is not None]

  def with_optional(kernel, num_leading: int):
    def body(*refs):
      it = iter(refs[num_leading:num_leading + len(given)])
      seg_ref, gate_ref = (None if x is None else next(it) for x in optional)
      kernel(*refs[:num_leading], seg_ref, gate_ref, *refs[num_leading + len(given):])
    return body
  return given, with_optional
