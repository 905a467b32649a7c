"""Stick-breaking attention on the Pallas Triton kernels, differentiable through ``jax.custom_vjp``.

Pads the sequence to a multiple of the block sizes and the head dims to powers of two (padded
keys sit after every real query, so causality hides them; padded rows and columns are sliced off),
runs the forward kernel, and wires the backward kernels of ``pallas_triton_bwd``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sbjax.kernels import pallas_triton_bwd, pallas_triton_fwd
from sbjax.kernels.pallas_triton_config import BlockSizes

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


def padded_head_dim(h: int) -> int:
  """Head dims are padded to a power of two (Triton tiles), at least 16 (the smallest dot)."""
  return 1 << (max(h, 16) - 1).bit_length()


def _pad_to(x, axis: int, size: int, mode: str = "constant"):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, mode=mode)


def unsupported(query, value) -> str | None:
  """Why the kernels cannot take these inputs, or None if they can."""
  if query.dtype not in SUPPORTED_DTYPES:
    return f"supports float32, bfloat16 and float16 inputs, got query.dtype={query.dtype}"
  for name, x in (("query", query), ("value", value)):
    if x.shape[-1] > MAX_HEAD_DIM:
      return f"supports head dims up to {MAX_HEAD_DIM}, got {name}.shape={x.shape}"
  return None


def stick_breaking_attention(query, key, value, scale, segment_ids=None, *, attend_current=False,
                             block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Same contract as ``sbjax.reference.stick_breaking_attention`` for inputs that ``unsupported``
  accepts; ``segment_ids`` int32. Arguments are checked by ``sbjax.ops``."""
  b, t, n, h = query.shape
  hv = value.shape[-1]
  hp, hvp = padded_head_dim(h), padded_head_dim(hv)
  block_sizes = block_sizes or BlockSizes.get_default(hp, query.dtype)
  tp = -(-t // block_sizes.seq_multiple) * block_sizes.seq_multiple
  q = _pad_to(_pad_to(query, 3, hp), 1, tp)
  k = _pad_to(_pad_to(key, 3, hp), 1, tp)
  v = _pad_to(_pad_to(value, 3, hvp), 1, tp)
  # Padded rows continue the last segment, so they let their row block stop as early as it would.
  seg = None if segment_ids is None else _pad_to(segment_ids, 1, tp, mode="edge")
  out, rem = _attention(q, k, v, jnp.reshape(scale, (1,)).astype(jnp.float32), seg,
                        (attend_current, block_sizes, interpret))
  return out[:, :t, :, :hv], rem.transpose(0, 2, 1)[:, :t]  # rem [B, N, T] -> [B, T, N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, scale, seg, static):
  attend_current, block_sizes, interpret = static
  return pallas_triton_fwd.forward(q, k, v, scale, seg, attend_current=attend_current,
                                   block_sizes=block_sizes, interpret=interpret)


def _attention_fwd(q, k, v, scale, seg, static):
  # The backward recomputes everything it needs from the inputs: no residual beyond them.
  return _attention(q, k, v, scale, seg, static), (q, k, v, scale, seg)


def _attention_bwd(static, residuals, cotangents):
  attend_current, block_sizes, interpret = static
  q, k, v, scale, seg = residuals
  d_out, d_rem = cotangents
  dq, dk, dv, dscale = pallas_triton_bwd.backward(
      q, k, v, scale, seg, d_out, d_rem, attend_current=attend_current,
      block_sizes=block_sizes, interpret=interpret)
  return dq, dk, dv, dscale, None


_attention.defvjp(_attention_fwd, _attention_bwd)
