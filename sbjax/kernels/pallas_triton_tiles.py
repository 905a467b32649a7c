"""Tile math shared by the forward and backward Pallas Triton kernels.

Logits are in base 2 (``x = z * log2(e)``) so that the special functions are ``exp2``/``log2``.
One visibility rule (``sbjax.common.visible_mask``, with ``lag`` for the block ranges), one
function for a tile's stick weights (``stick_weights``), one walk order (``heaviest_first``,
``walk_right_to_left``), and masked loads/stores for partial blocks (``load``, ``store``).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sbjax import common
from sbjax.common import SKIP_LOG2, stop_log2  # the kernels' skip rule, shared with Mosaic GPU

LOG2E = math.log2(math.e)
# softplus(z) = z above 15 nats (exact to fp32 rounding there: log(1 + e^-15) = 3e-7 < ulp(15)).
SOFTPLUS_CUT = 15.0 * LOG2E
# softplus is clamped here (base 2), so that an infinite logit (an infinite query or key element)
# gives a finite log2(1 - beta): the in-block sums would otherwise form inf - inf (bf16 parts) and
# 0 * inf (the triangular matmul) and poison whole rows. Any clamp above -SKIP_LOG2 changes no
# result: weights behind such a key are below 2^-152 either way. 2^20 is exact in bf16.
SOFTPLUS_MAX = 2.0**20


def _f32_hex(x: float) -> str:
  return "0f" + struct.pack(">f", x).hex().upper()  # PTX spells f32 literals in hex


# ex2/lg2.approx on the special-function unit, one branch per element instead of Triton's
# generic exp2/log2 (which add range reduction). Input and output in base 2: softplus2(x), cut to
# x above SOFTPLUS_CUT and clamped to SOFTPLUS_MAX. A NaN logit takes the lower branch: NaN.
_SOFTPLUS2_ASM = """
{
  .reg .pred p;
  setp.gt.f32 p, $1, %s;
  @p min.f32 $0, $1, %s;
  @!p ex2.approx.ftz.f32 $0, $1;
  @!p add.f32 $0, $0, 0f3F800000;
  @!p lg2.approx.ftz.f32 $0, $0;
}
""" % (_f32_hex(SOFTPLUS_CUT), _f32_hex(SOFTPLUS_MAX))


def _softplus2(x, *, fast: bool, exact: bool):
  if fast and not exact:
    (y,) = plgpu.elementwise_inline_asm(
        _SOFTPLUS2_ASM, args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y
  sp = jnp.log1p(jnp.exp2(x)) * LOG2E if exact else jnp.log2(1.0 + jnp.exp2(x))
  return jnp.where(x > SOFTPLUS_CUT, jnp.minimum(x, SOFTPLUS_MAX), sp)


def stick_terms(x, *, fast: bool, exact: bool):
  """``(log2 beta, log2(1 - beta))`` for base-2 logits ``x``: ``(x - sp, -sp)``, ``sp = softplus2(x)``.

  ``sp = log2(1 + 2^x)`` is cut to ``x`` above ``SOFTPLUS_CUT`` and clamped to ``SOFTPLUS_MAX``;
  ``x = +inf`` gives ``(0, -SOFTPLUS_MAX)``, ``x = -inf`` gives ``(-inf, 0)``: beta = 1 and 0.
  ``x - sp`` is capped at 0: exact above the cut, where it is ``x - x`` (NaN for ``x = +inf``
  without the cap), and a correction of the approximate softplus just below it.

  ``fast`` uses the PTX above (GPU); without it, the same formulas in jnp (interpret mode).
  ``log2(1 + 2^x)`` rounds ``1 + 2^x``: an absolute error up to 2^-24 per key (2^x itself once
  x < -24), which sums along the row; below bf16/fp16 resolution, not below fp32's. ``x - sp``
  cancels for large positive ``x`` (absolute error ``eps * x``), again below bf16/fp16 resolution.
  ``exact`` (fp32 inputs) takes ``log1p`` and spends two more special-function calls on
  ``log2 beta = -softplus2(-x)``.
  """
  sp = _softplus2(x, fast=fast, exact=exact)
  if exact:
    return -_softplus2(-x, fast=fast, exact=True), -sp
  return jnp.minimum(x - sp, 0.0), -sp


def dot_precision(dtype):
  """fp32 inputs get true fp32 products (IEEE); bf16/fp16 the tensor cores' native precision."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  """``a @ b`` (optionally transposed operands) accumulated in fp32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def triangle(block: int, keep):
  """``T [block, block]`` in bf16 with ``T[m, i] = keep(m, i)``: ``(x @ T)[r, i]`` sums ``x[r, m]``
  over the keys ``m`` that ``keep`` pairs with ``i`` (e.g. ``m > i``: the nearer keys)."""
  m = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
  i = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
  return keep(m, i).astype(jnp.bfloat16)


def masked_row_sums(x, triangle, *, parts: int):
  """``x @ triangle`` for fp32 ``x [R, C]`` and a 0/1 bf16 ``triangle``: in-block cumulative sums.

  Pallas-Triton has no reverse cumsum, so cumulative sums are products with a triangular matrix on
  the tensor cores. ``x`` is split into ``parts`` bf16 terms (hi + lo + ...) so the result keeps
  about ``8 * parts`` bits (``cumsum_parts``).
  """
  out = None
  for _ in range(parts):
    term = x.astype(jnp.bfloat16)
    out = dot(term, triangle) if out is None else out + dot(term, triangle)
    x = x - term.astype(jnp.float32)
  return out


def cumsum_parts(dtype) -> int:
  """bf16 parts of the in-block sums of ``log2(1 - beta)``: 3 (fp32 accuracy) for fp32, 2 for
  fp16, 1 for bf16. One part rounds each term to bf16 (relative error 2^-9); the terms share a
  sign, so the sum's relative error is at most 2^-9 too, and a weight ``A = 2^(... + sum)`` moves
  by at most ``A ln2 |sum| 2^-9 <= 2^-9 / e`` absolutely (the maximum of ``x 2^-x ln2`` is
  ``1/e``): below bf16's resolution, not below fp16's (the H200 check's fp16 dscale failed with
  one part). A second part costs about a third more forward time (H200)."""
  return {jnp.dtype(jnp.float32): 3, jnp.dtype(jnp.float16): 2}.get(jnp.dtype(dtype), 1)


def div(a, b: int):
  """``a // b`` for non-negative int32 ``a`` (``lax.div``, which Triton lowers directly; the int32
  divisor keeps it int32 under ``jax_enable_x64``)."""
  return jax.lax.div(a, jnp.int32(b))


def positions(start, size: int):
  """``start + [0, size)`` as int32."""
  return start + jnp.arange(size, dtype=jnp.int32)


def lag(attend_current: bool) -> int:
  """Key ``i`` can be visible to query ``j`` iff ``i <= j - lag`` (the causal half of the rule)."""
  return 0 if attend_current else 1


def visible(q_pos, k_pos, q_seg, k_seg, *, attend_current: bool, causal: bool = True,
            k_valid=None):
  """``[Q, S]`` bool: key ``k_pos[s]`` is visible to query ``q_pos[r]`` (``common.visible_mask``).

  ``causal=False`` (the fully visible cross-chunk mode) sees every key of the query's segment
  that lies in the chunk: ``k_valid [S]`` (or None) marks the keys before the chunk's end (causal
  masks never reach past the end: the last query is there)."""
  mask = common.visible_mask(q_pos, k_pos, q_seg, k_seg, attend_current=attend_current,
                             causal=causal)
  return mask if k_valid is None else mask & k_valid[None, :]


def key_blocks_seen(q_block, *, block_q, block_k, num_k_blocks: int, attend_current,
                    causal: bool = True, partial_k: bool = False):
  """Key blocks seen by query block ``q_block``: ``(n_full, n_total)``.

  Blocks ``[0, n_full)`` are causally visible to every row; ``[n_full, n_total)`` need the mask.
  ``n_total`` stops at ``num_k_blocks``, the sequence's last (possibly partial) key block.
  ``causal=False``: every block, the last masked when ``partial_k`` (keys past the chunk's end).
  """
  if not causal:
    return jnp.int32(num_k_blocks - int(partial_k)), jnp.int32(num_k_blocks)
  first_last_key = q_block * block_q - lag(attend_current)  # last key the block's first row sees
  n_total = jnp.minimum(div(first_last_key + block_q - 1 + block_k, block_k), num_k_blocks)
  return jnp.minimum(div(first_last_key + 1, block_k), n_total), n_total


def query_blocks_seeing(k_block, *, block_k, block_q, attend_current, causal: bool = True):
  """Query blocks that see key block ``k_block``: from ``j_first``; from ``j_full`` on, every row
  sees every key of it (the mirror of ``key_blocks_seen``; every block for ``causal=False``)."""
  if not causal:
    return jnp.int32(0), jnp.int32(0)
  first_row = k_block * block_k + lag(attend_current)  # first row that sees the block's first key
  j_first = div(first_row, block_q)
  j_full = div(first_row + block_k - 1 + block_q - 1, block_q)
  return j_first, j_full


def heaviest_first(program, num_blocks: int):
  """Query block of grid index ``program``: the last (heaviest, most keys) blocks start first."""
  return num_blocks - 1 - program


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def padded_head_dim(h: int) -> int:
  """Tiles span head dims padded to a power of two (Triton), at least 16 (the smallest dot); the
  padding is masked on load, never materialised."""
  return 1 << (max(h, 16) - 1).bit_length()


def load(ref, *, rows=None, cols=None):
  """``ref[...]`` with out-of-range rows (``rows``: ``[R]`` bool or None) and columns (``cols``:
  ``[C]`` bool or None) read as 0; masks are None where the block lies inside the array."""
  mask = _mask(ref.shape, rows, cols)
  return ref[...] if mask is None else plgpu.load(ref, mask=mask, other=0)


def store(ref, value, *, rows=None, cols=None):
  """``ref[...] = value``, skipping out-of-range rows and columns (see ``load``)."""
  mask = _mask(ref.shape, rows, cols)
  if mask is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=mask)


def _mask(shape, rows, cols):
  if rows is None and cols is None:
    return None
  if len(shape) == 1:
    return rows if rows is not None else cols
  mask = jnp.ones(shape, jnp.bool_)
  if rows is not None:
    mask = mask & rows[:, None]
  if cols is not None:
    mask = mask & cols[None, :]
  return mask


def in_range(start, size: int, limit: int, *, partial: bool):
  """``[size]`` bool ``start + i < limit``, or None where no block can be partial (static)."""
  return positions(start, size) < limit if partial else None


class KeyGate(NamedTuple):
  """Forget-gate terms of a tile's keys, base 2: ``log2 f`` and ``log2(1 - f)``, ``[S]`` each."""
  log_f: jax.Array
  log_1mf: jax.Array


def key_gate(gate_logits):
  """``KeyGate`` from natural-log gate logits ``g [S]`` (fp32): ``f = sigmoid(g)``, not clamped,
  so ``g = +inf`` gives ``log2(1 - f) = -inf`` and the ungated stick exactly."""
  x = gate_logits * LOG2E
  softplus = lambda y: jnp.where(y > SOFTPLUS_CUT, y, jnp.log1p(jnp.exp2(y)) * LOG2E)
  return KeyGate(-softplus(-x), -softplus(x))


def logaddexp2(a, b):
  """``log2(2^a + 2^b)`` for ``a, b <= 0``, not both ``-inf``."""
  hi = jnp.maximum(a, b)
  return hi + jnp.log1p(jnp.exp2(jnp.minimum(a, b) - hi)) * LOG2E


class StickTile(NamedTuple):
  """A ``[Q, S]`` tile of stick weights and the terms the backward needs (base 2).

  a: weights ``A`` (0 where invisible). log_beta: ``log2 beta`` (gated). log_s, log_1m_s:
  ``log2 sigmoid(z)`` and ``log2(1 - sigmoid(z))`` (ungated). log_1m_beta: ``log2(1 - beta)``,
  0 where invisible. stick_sum: ``[Q]`` row sums of ``log_1m_beta``.
  """
  a: jax.Array
  log_beta: jax.Array
  log_s: jax.Array
  log_1m_s: jax.Array
  log_1m_beta: jax.Array
  stick_sum: jax.Array


def stick_weights(x, log_stick, *, mask, gate: KeyGate | None, nearer, parts: int, fast: bool,
                  exact: bool) -> StickTile:
  """The stick weights of one tile, as the forward and backward kernels compute them.

  Args:
    x: ``[Q, S]`` base-2 logits.
    log_stick: ``[Q]`` sum of ``log2(1 - beta)`` over the keys right of the tile.
    mask: ``[Q, S]`` visibility, or None (every key visible).
    gate: the tile's ``KeyGate``, or None: ``beta = f sigmoid(z)`` and
      ``log2(1 - beta) = logaddexp2(log2(1 - f), log2 f + log2(1 - sigmoid(z)))``.
    nearer: ``triangle(S, m > i)``; parts: bf16 parts of the in-block sums (``masked_row_sums``).
  """
  log_s, log_1m_s = stick_terms(x, fast=fast, exact=exact)
  if gate is None:
    log_beta, log_1m_beta = log_s, log_1m_s
  else:
    log_beta = gate.log_f[None, :] + log_s
    log_1m_beta = logaddexp2(jnp.broadcast_to(gate.log_1mf[None, :], x.shape),
                             gate.log_f[None, :] + log_1m_s)
  if mask is not None:
    log_1m_beta = jnp.where(mask, log_1m_beta, 0.0)
  # log2 A = log2 beta + (log2(1 - beta) summed over the nearer keys, in this tile and to its right)
  a = jnp.exp2(log_beta + masked_row_sums(log_1m_beta, nearer, parts=parts) + log_stick[:, None])
  if mask is not None:
    a = jnp.where(mask, a, 0.0)
  return StickTile(a, log_beta, log_s, log_1m_s, log_1m_beta, jnp.sum(log_1m_beta, axis=1))


def walk_right_to_left(tile, carry, log_stick, *, n_full, n_total, skip: bool,
                       blocks_per_check: int = 1, stop: float = SKIP_LOG2):
  """Runs ``carry = tile(kb, carry, masked=...)`` for key blocks from the diagonal leftwards.

  The masked diagonal blocks come first; the walk over the fully visible ones stops early, when
  ``skip``, once ``log_stick(carry) [Q]`` (each row's log2 stick; rows past the sequence end must
  read -inf) is below ``stop`` in every row. The test runs once per ``blocks_per_check`` blocks:
  between tests the blocks go through a ``fori_loop`` that Triton software-pipelines (a
  ``while_loop`` per block is not). Blocks walked past the stop hold weights below ``2^stop``
  (exactly 0 for ``SKIP_LOG2``). Returns ``(first, carry)``: blocks ``[first, n_total)`` were
  walked. Measured on an H200 (bf16, T=16384, rows that never stop): 9% slower than the dense
  walk with 4 or 8 blocks per test, 13% with 2; chunks that double after each test were slower
  still (19%), so the cost is not the pipeline restarts alone.
  """
  def run(hi, count, carry):  # blocks hi - 1, ..., hi - count
    return jax.lax.fori_loop(0, count, lambda t, c: tile(hi - 1 - t, c, masked=False), carry)

  carry = jax.lax.fori_loop(
      0, n_total - n_full, lambda t, c: tile(n_total - 1 - t, c, masked=True), carry)
  if not skip:
    return jnp.int32(0), run(n_full, n_full, carry)
  # One copy of the tile's code for all chunks (the last may be shorter): a separate loop for
  # the far end's remainder would be a third copy of a large body.
  def chunk(state):
    hi, carry = state
    count = jnp.minimum(hi, blocks_per_check)
    return hi - count, run(hi, count, carry)

  return jax.lax.while_loop(
      lambda state: (state[0] > 0) & (jnp.max(log_stick(state[1])) > stop), chunk,
      (n_full, carry))
