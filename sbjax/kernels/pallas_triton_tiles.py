"""Tile math shared by the forward and backward Pallas Triton kernels.

Logits are in base 2 (``x = z * log2(e)``) so that the special functions are ``exp2``/``log2``.
"""

from __future__ import annotations

import math
import struct

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
# Once a row's stick is below 2^SKIP_LOG2, every farther key's weight exp2(log2 beta + stick) is
# below 2^-152 and rounds to exactly 0 in fp32: stopping the walk there changes no bit of the result.
SKIP_LOG2 = -152.0
# softplus(z) = z above 15 nats (exact to fp32 rounding there: log(1 + e^-15) = 3e-7 < ulp(15)).
SOFTPLUS_CUT = 15.0 * LOG2E

# ex2/lg2.approx on the special-function unit, one branch per element instead of Triton's
# generic exp2/log2 (which add range reduction). Input and output in base 2.
_SOFTPLUS2_ASM = """
{
  .reg .pred p;
  setp.gt.f32 p, $1, %s;
  @p mov.f32 $0, $1;
  @!p ex2.approx.ftz.f32 $0, $1;
  @!p add.f32 $0, $0, 0f3F800000;
  @!p lg2.approx.ftz.f32 $0, $0;
}
""" % ("0f" + struct.pack(">f", SOFTPLUS_CUT).hex().upper())  # PTX spells f32 literals in hex


def softplus2(x, *, fast: bool, exact: bool = False):
  """``log2(1 + 2^x)``, cut to ``x`` above ``SOFTPLUS_CUT``.

  ``fast`` uses the PTX above. ``log2(1 + 2^x)`` rounds ``1 + 2^x``: an absolute error up to
  2^-24 per key (2^x itself once x < -24), which sums along the row; below bf16/fp16 resolution,
  not below fp32's. ``exact`` (fp32 inputs) takes ``log1p`` instead.
  """
  if exact:
    return jnp.where(x > SOFTPLUS_CUT, x, jnp.log1p(jnp.exp2(x)) * LOG2E)
  if fast:
    (y,) = plgpu.elementwise_inline_asm(
        _SOFTPLUS2_ASM, args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y
  return jnp.where(x > SOFTPLUS_CUT, x, jnp.log2(1.0 + jnp.exp2(x)))


def log2_sigmoid(x, sp, *, exact: bool, fast: bool):
  """``log2 sigmoid(z)`` from base-2 logits ``x`` and ``sp = softplus2(x)``.

  ``x - sp`` cancels for large positive ``x`` (absolute error ``eps * x``), which is far below bf16
  and fp16 resolution but not fp32's: ``exact`` spends two more special-function calls on
  ``-softplus2(-x)`` instead.
  """
  return -softplus2(-x, fast=fast, exact=True) if exact else x - sp


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
  about ``8 * parts`` bits: 2 parts for bf16/fp16 inputs, 3 (fp32 accuracy) for fp32 inputs.
  """
  out = None
  for _ in range(parts):
    term = x.astype(jnp.bfloat16)
    out = dot(term, triangle) if out is None else out + dot(term, triangle)
    x = x - term.astype(jnp.float32)
  return out


def cumsum_parts(dtype) -> int:
  return 3 if jnp.dtype(dtype) == jnp.float32 else 2


def div(a, b: int):
  """``a // b`` for non-negative int32 ``a`` (``lax.div``, which Triton lowers directly; the int32
  divisor keeps it int32 under ``jax_enable_x64``)."""
  return jax.lax.div(a, jnp.int32(b))


def positions(start, size: int):
  """``start + [0, size)`` as int32."""
  return start + jnp.arange(size, dtype=jnp.int32)


def visible(q_pos, k_pos, q_seg, k_seg, *, attend_current: bool):
  """``[Q, S]`` bool: key ``k_pos[s]`` is visible to query ``q_pos[r]``."""
  mask = (k_pos[None, :] <= q_pos[:, None]) if attend_current else (k_pos[None, :] < q_pos[:, None])
  if q_seg is not None:
    mask = mask & (q_seg[:, None] == k_seg[None, :])
  return mask


def key_block_range(q_block, *, block_q, block_k, attend_current):
  """Key blocks seen by query block ``q_block``: ``(n_full, n_total)``.

  Blocks ``[0, n_full)`` are visible to every row; ``[n_full, n_total)`` need the causal mask.
  """
  first_row = q_block * block_q
  last_key = first_row + block_q - 1 - (0 if attend_current else 1)  # of the block's last row
  n_total = div(last_key + block_k, block_k)
  n_full = jnp.minimum(div(first_row + int(attend_current), block_k), n_total)
  return n_full, n_total


def walk_right_to_left(tile, carry, log_stick, *, n_full, n_total, skip: bool):
  """Runs ``carry = tile(kb, carry, masked=...)`` for key blocks from the diagonal leftwards.

  The masked diagonal blocks come first; the walk over the fully visible ones stops early, when
  ``skip``, once ``log_stick(carry) [Q]`` (each row's log2 stick) is below ``SKIP_LOG2`` in every
  row. Returns ``(first, carry)``: blocks ``[first, n_total)`` were walked.
  """
  carry = jax.lax.fori_loop(
      0, n_total - n_full, lambda t, c: tile(n_total - 1 - t, c, masked=True), carry)
  if not skip:
    carry = jax.lax.fori_loop(
        0, n_full, lambda t, c: tile(n_full - 1 - t, c, masked=False), carry)
    return jnp.int32(0), carry
  kb, carry = jax.lax.while_loop(
      lambda state: (state[0] >= 0) & (jnp.max(log_stick(state[1])) > SKIP_LOG2),
      lambda state: (state[0] - 1, tile(state[0], state[1], masked=False)),
      (n_full - 1, carry))
  return kb + 1, carry
