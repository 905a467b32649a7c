"""Stick-breaking attention on the Pallas Triton kernels, differentiable through ``jax.custom_vjp``.

The kernels read the inputs in place (partial last blocks and non-power-of-two head dims are
masked in the kernels, as in JAX's ``pallas/ops/gpu/attention.py``), so the custom VJP keeps only
the caller's arrays as residuals; the backward kernels of ``pallas_triton_bwd`` recompute the rest.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from sbjax.kernels import pallas_triton_bwd, pallas_triton_fwd
from sbjax.kernels.pallas_triton_config import BlockSizes

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


def unsupported(query, value) -> str | None:
  """Why the kernels cannot take these inputs, or None if they can."""
  if query.dtype not in SUPPORTED_DTYPES:
    return f"supports float32, bfloat16 and float16 inputs, got query.dtype={query.dtype}"
  for name, x in (("query", query), ("value", value)):
    if x.shape[-1] > MAX_HEAD_DIM:
      return f"supports head dims up to {MAX_HEAD_DIM}, got {name}.shape={x.shape}"
  return None


def stick_breaking_attention(query, key, value, scale, segment_ids=None, forget_gate=None, *,
                             attend_current=False, block_sizes: BlockSizes | None = None,
                             skip_tolerance: float = 0.0, interpret: bool = False,
                             reference_vjp: Callable | None = None, causal: bool = True,
                             key_segment_ids=None):
  """Same contract as ``sbjax.reference.stick_breaking_attention`` for inputs that ``unsupported``
  accepts; ``segment_ids`` int32, ``forget_gate [B, T, K]`` float32. Arguments are checked by
  ``sbjax.ops`` (``sbjax.context_parallel`` for ``causal=False``). ``skip_tolerance``: see
  ``sbjax.stick_breaking_attention``. ``causal=False``: the fully visible cross-chunk mode (query
  and key chunks of one length T; ``key_segment_ids [B, T]`` int32 with ``segment_ids``).

  ``reference_vjp`` is for tests (tokamax style): a function with the signature of
  ``sbjax.reference.stick_breaking_attention``; when given, the forward kernel runs as usual and
  the gradients are autodiff of that function instead of the backward kernels.
  """
  block_sizes = block_sizes or BlockSizes.get_default(query.shape[-1], query.dtype)
  # hashable, not differentiated
  static = (attend_current, block_sizes, float(skip_tolerance), interpret, reference_vjp, causal)
  k_seg = segment_ids if causal else key_segment_ids
  out, rem = _attention(query, key, value, jnp.reshape(scale, (1,)).astype(jnp.float32),
                        segment_ids, k_seg, forget_gate, static)
  return out, rem.transpose(0, 2, 1)  # rem [B, N, T] -> [B, T, N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, scale, seg, k_seg, gate, static):
  attend_current, block_sizes, skip_tolerance, interpret, _, causal = static
  return pallas_triton_fwd.forward(q, k, v, scale, seg, gate, attend_current=attend_current,
                                   block_sizes=block_sizes, skip_tolerance=skip_tolerance,
                                   interpret=interpret, causal=causal, key_segment_ids=k_seg)


def _attention_fwd(q, k, v, scale, seg, k_seg, gate, static):
  # The backward recomputes everything it needs from the inputs: no residual beyond them.
  return (_attention(q, k, v, scale, seg, k_seg, gate, static),
          (q, k, v, scale, seg, k_seg, gate))


def _attention_bwd(static, residuals, cotangents):
  attend_current, block_sizes, skip_tolerance, interpret, reference_vjp, causal = static
  q, k, v, scale, seg, k_seg, gate = residuals
  d_out, d_rem = cotangents
  if reference_vjp is not None:
    def reference(q, k, v, scale, gate):
      out, rem = reference_vjp(q, k, v, scale[0], seg, gate, attend_current=attend_current,
                               **({} if causal else dict(causal=False, key_segment_ids=k_seg)))
      return out, rem.transpose(0, 2, 1).astype(jnp.float32)
    _, vjp = jax.vjp(reference, q, k, v, scale, gate)
    dq, dk, dv, dscale, dgate = vjp((d_out, d_rem))
    return dq, dk, dv, dscale, None, None, dgate
  dq, dk, dv, dscale, dgate = pallas_triton_bwd.backward(
      q, k, v, scale, seg, gate, d_out, d_rem, attend_current=attend_current,
      block_sizes=block_sizes, skip_tolerance=skip_tolerance, interpret=interpret, causal=causal,
      key_segment_ids=k_seg)
  return dq, dk, dv, dscale, None, None, dgate


# optimize_remat: under jax.checkpoint the forward kernel is not run twice (JAX recommends it for
# Pallas forwards).
_attention.defvjp(_attention_fwd, _attention_bwd, optimize_remat=True)
