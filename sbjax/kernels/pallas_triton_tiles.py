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


def softplus2(x, *, fast: bool):
  """``log2(1 + 2^x)``, cut to ``x`` above ``SOFTPLUS_CUT``; ``fast`` uses the PTX above."""
  if fast:
    (y,) = plgpu.elementwise_inline_asm(
        _SOFTPLUS2_ASM, args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y
  return jnp.where(x > SOFTPLUS_CUT, x, jnp.log2(1.0 + jnp.exp2(x)))


def dot_precision(dtype):
  """fp32 inputs get true fp32 products (IEEE); bf16/fp16 the tensor cores' native precision."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  """``a @ b`` (optionally transposed operands) accumulated in fp32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def strict_upper(block: int):
  """``U [block, block]`` in bf16, ``U[m, i] = (m > i)``: ``x @ U`` sums ``x`` over ``m > i``."""
  m = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
  i = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
  return (m > i).astype(jnp.bfloat16)


def inclusive_lower(block: int):
  """``L [block, block]`` in bf16, ``L[m, i] = (m <= i)``: ``x @ L`` sums ``x`` over ``m <= i``."""
  m = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
  i = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
  return (m <= i).astype(jnp.bfloat16)


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


def visible(q_pos, k_pos, q_seg, k_seg, *, attend_current: bool):
  """``[Q, S]`` bool: key ``k_pos[s]`` is visible to query ``q_pos[r]``."""
  mask = (k_pos[None, :] <= q_pos[:, None]) if attend_current else (k_pos[None, :] < q_pos[:, None])
  if q_seg is not None:
    mask = mask & (q_seg[:, None] == k_seg[None, :])
  return mask
