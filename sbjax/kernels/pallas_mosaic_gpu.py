"""Stick-breaking attention on the Pallas Mosaic GPU (Hopper) kernels, differentiable through
``jax.custom_vjp``: the forward of ``pallas_mosaic_gpu_fwd``, the backward of
``pallas_mosaic_gpu_bwd`` (which recomputes what it needs from the inputs: no residual beyond
them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from sbjax.kernels import pallas_mosaic_gpu_bwd, pallas_mosaic_gpu_fwd
from sbjax.kernels.pallas_mosaic_gpu_config import MosaicBlockSizes

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS = (64, 128)


def unsupported(query, value) -> str | None:
  """Why the Mosaic GPU kernel cannot take these inputs, or None if it can."""
  if query.dtype not in SUPPORTED_DTYPES:
    return (f"supports bfloat16 and float16 inputs (float32 stays on the Triton kernels), got "
            f"query.dtype={query.dtype}")
  if query.shape[-1] not in HEAD_DIMS or value.shape[-1] != query.shape[-1]:
    return (f"supports head dims {HEAD_DIMS} with value's equal to query's (wgmma tiles of 64), "
            f"got query.shape={query.shape}, value.shape={value.shape}")
  return None


def stick_breaking_attention(query, key, value, scale, segment_ids=None, forget_gate=None, *,
                             attend_current=False, block_sizes: MosaicBlockSizes | None = None,
                             skip_tolerance: float = 0.0, interpret: bool = False,
                             causal: bool = True, key_segment_ids=None):
  """``(out [B, T, N, H], rem [B, T, N] float32)`` for inputs that ``unsupported`` accepts;
  arguments are checked by ``sbjax.ops``. ``segment_ids``: ``[B, T]`` integers or None;
  ``forget_gate``: ``[B, T, K]`` float logits or None.
  ``skip_tolerance``: see ``sbjax.stick_breaking_attention``. ``interpret``: Mosaic GPU
  interpret mode (CPU, slow). ``causal=False``: the fully visible cross-chunk mode
  (``sbjax.context_parallel``; ``key_segment_ids [B, T]`` with ``segment_ids``)."""
  block_sizes = block_sizes or MosaicBlockSizes.get_default(query.shape[-1], query.dtype)
  static = (attend_current, block_sizes, float(skip_tolerance), interpret, causal)
  attention = _attention_interpret if interpret else _attention
  out, rem = attention(query, key, value, jnp.reshape(scale, (1,)).astype(jnp.float32),
                       segment_ids, None if causal else key_segment_ids, forget_gate, static)
  return out, rem.transpose(0, 2, 1)  # rem [B, N, T] -> [B, T, N]


def _interpret_params(interpret: bool):
  return plgpu.InterpretGPUParams() if interpret else False


def _forward(q, k, v, scale, segment_ids, key_segment_ids, forget_gate, static):
  attend_current, block_sizes, skip_tolerance, interpret, causal = static
  return pallas_mosaic_gpu_fwd.forward(
      q, k, v, scale, segment_ids, forget_gate, attend_current=attend_current,
      block_sizes=block_sizes, skip_tolerance=skip_tolerance,
      interpret=_interpret_params(interpret), causal=causal, key_segment_ids=key_segment_ids)


def _attention_fwd(q, k, v, scale, segment_ids, key_segment_ids, forget_gate, static):
  attend_current, block_sizes, skip_tolerance, interpret, causal = static
  if interpret and block_sizes.num_compute_warpgroups != 1:
    # The Mosaic GPU interpreter (JAX 0.11.2) deadlocks on a program that holds kernels of
    # different warpgroup counts (its simulated shared memory is set up once, apparently for
    # the first kernel's thread count). The backward's kernels have one warpgroup, so the
    # forward they follow takes the one-warpgroup structure here (the same maths per row).
    # Compiled kernels keep the given structure.
    block_sizes = dataclasses.replace(block_sizes, num_compute_warpgroups=1,
                                      schedule_barrier=False)
    static = (attend_current, block_sizes, skip_tolerance, interpret, causal)
  return (_forward(q, k, v, scale, segment_ids, key_segment_ids, forget_gate, static),
          (q, k, v, scale, segment_ids, key_segment_ids, forget_gate))


def _attention_bwd(static, residuals, cotangents):
  attend_current, block_sizes, skip_tolerance, interpret, causal = static
  q, k, v, scale, segment_ids, key_segment_ids, forget_gate = residuals
  d_out, d_rem = cotangents
  dq, dk, dv, dscale, dgate = pallas_mosaic_gpu_bwd.backward(
      q, k, v, scale, segment_ids, forget_gate, d_out, d_rem, attend_current=attend_current,
      block_sizes=block_sizes, skip_tolerance=skip_tolerance,
      interpret=_interpret_params(interpret), causal=causal, key_segment_ids=key_segment_ids)
  return dq, dk, dv, dscale, None, None, dgate


# optimize_remat: under jax.checkpoint the forward kernel is not run twice. Interpret mode's
# kernels have IO effects, which optimize_remat rejects: it gets a copy without.
_attention = jax.custom_vjp(_forward, nondiff_argnums=(7,))
_attention_interpret = jax.custom_vjp(_forward, nondiff_argnums=(7,))
_attention_interpret.defvjp(_attention_fwd, _attention_bwd)
_attention.defvjp(_attention_fwd, _attention_bwd, optimize_remat=True)
