"""Pure-JAX stick-breaking attention: query blocks, with the stick as an associative scan.

The portable fallback (CPU, GPU, TPU) and the path taken off NVIDIA GPUs. Each block of queries
builds its ``[B, N, block, T]`` logits, turns ``log(1 - beta)`` into the right-to-left cumulative
sum with ``jax.lax.associative_scan`` and contracts with the values. Blocks run one after another
under ``jax.lax.map`` and are rematerialised in the backward pass (``jax.checkpoint``), so peak
memory is about ``B * N * block * T`` floats instead of ``B * N * T^2``. Differentiable by autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sbjax.common import compute_dtype, split_heads, stick_breaking_weights, visible_mask

# Upper bound on the elements of one block's [B, N, block, T] logits: 2^27 fp32 is 512 MiB, a few
# of which (logits, cumulative sums, weights and their cotangents) are live at once.
_BLOCK_ELEMENTS = 2**27


def default_block_q(batch: int, num_heads: int, seq_len: int) -> int:
  """Queries per block: ``T`` if one block fits ``_BLOCK_ELEMENTS`` (at least 16 rows), else the
  fewest blocks that fit, of equal size rounded up to a multiple of 8. Padding is then under
  ``9 * num_blocks`` rows, so cost grows smoothly with ``T`` (T=4097 does not cost as much as 8192).
  """
  rows = max(_BLOCK_ELEMENTS // (batch * num_heads * seq_len), 16)
  if rows >= seq_len:
    return seq_len
  num_blocks = -(-seq_len // rows)
  block = -(-seq_len // num_blocks)
  return -(-block // 8) * 8


def _reverse_scan(x):
  return jax.lax.associative_scan(jnp.add, x, reverse=True, axis=x.ndim - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _weighted_values(weights, value, precision):
  """``weights [B, K, G, Q, S]`` (rounded to ``value.dtype``, as in the kernels) times ``value
  [B, S, K, Hv]`` -> ``[B, Q, K, G, Hv]``, accumulated in ``weights.dtype``.

  The custom VJP keeps the weights' cotangent in full precision: autodiff of the rounding would
  round it to ``value.dtype`` as well, and in bf16 that made ``dscale`` ~600x less accurate.
  """
  return jnp.einsum("BKGQS,BSKH->BQKGH", weights.astype(value.dtype), value, precision=precision,
                    preferred_element_type=weights.dtype)


def _weighted_values_fwd(weights, value, precision):
  return _weighted_values(weights, value, precision), (weights, value)


def _weighted_values_bwd(precision, residuals, d_out):
  weights, value = residuals
  d_weights = jnp.einsum("BQKGH,BSKH->BKGQS", d_out, value.astype(d_out.dtype),
                         precision=jax.lax.Precision.HIGHEST)
  d_value = jnp.einsum("BKGQS,BQKGH->BSKH", weights.astype(value.dtype), d_out.astype(value.dtype),
                       precision=precision, preferred_element_type=weights.dtype)
  return d_weights, d_value.astype(value.dtype)


_weighted_values.defvjp(_weighted_values_fwd, _weighted_values_bwd)


# Jitted so that eager calls compile once per shape: lax.map would otherwise be traced and compiled
# on every call (seconds each).
@functools.partial(jax.jit, static_argnames=("attend_current", "block_q", "causal"))
def stick_breaking_attention(
    query, key, value, scale, segment_ids=None, forget_gate=None, *, attend_current=False,
    block_q=None, causal=True, key_segment_ids=None
):
  """Stick-breaking attention by query blocks; same contract as ``sbjax.reference``.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, T, K, H]`` with ``N % K == 0``.
    value: ``[B, T, K, Hv]``.
    scale: scalar multiplying ``q . k`` (may be traced).
    segment_ids: optional ``[B, T]`` integers.
    forget_gate: optional ``[B, T, K]`` logits (see ``sbjax.reference``).
    attend_current: whether query ``j`` also sees key ``j``.
    block_q: queries per block; default from :func:`default_block_q`.
    causal: False is the fully visible cross-chunk mode (the queries attend to an earlier chunk
      of keys: every key visible, a fresh stick from the chunk's last key; ``attend_current``
      ignored); ``segment_ids`` are then the queries' and ``key_segment_ids`` the keys'.

  Returns:
    ``(out [B, T, N, Hv] in query.dtype, rem [B, T, N] in compute_dtype(query.dtype))``.
  """
  b, t, n, _ = query.shape
  num_kv_heads, hv = key.shape[2], value.shape[-1]
  dtype = compute_dtype(query.dtype)
  block_q = block_q or default_block_q(b, n, t)
  num_blocks = -(-t // block_q)
  pad = num_blocks * block_q - t

  # Products of bf16/fp16 values are exact in fp32: the matmuls take the inputs as they are and
  # accumulate in fp32 (the weights are rounded to the input dtype for the second one, as in the
  # kernels); fp32 and fp64 inputs get full-precision products.
  precision = jax.lax.Precision.HIGHEST if query.dtype in (jnp.float32, jnp.float64) else None
  q = split_heads(query, num_kv_heads)  # [B, T, K, G, H]
  scale = jnp.asarray(scale, dtype)
  k_pos = jnp.arange(key.shape[1])
  q_pos = jnp.arange(t + pad)
  q_seg = segment_ids
  k_seg_ids = segment_ids if causal else key_segment_ids
  k_seg = None if k_seg_ids is None else k_seg_ids[:, None, None]  # [B, 1, 1, S]
  gate = None
  if forget_gate is not None:
    gate = jnp.einsum("BSK->BKS", forget_gate.astype(dtype))[:, :, None, None, :]  # [B, K, 1, 1, S]
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    if segment_ids is not None:
      q_seg = jnp.pad(segment_ids, ((0, 0), (0, pad)))

  @jax.checkpoint
  def one_block(args):
    q_blk, pos_blk, seg_blk = args  # [B, Q, K, G, H], [Q], [B, Q] or None
    logits = jnp.einsum("BQKGH,BSKH->BKGQS", q_blk, key, precision=precision,
                        preferred_element_type=dtype)
    seg_blk = None if seg_blk is None else seg_blk[:, None, None]  # [B, 1, 1, Q]
    mask = visible_mask(pos_blk, k_pos, seg_blk, k_seg, attend_current=attend_current,
                        causal=causal)
    weights, log_rem = stick_breaking_weights(logits * scale, mask, cumsum=_reverse_scan, gate=gate)
    out = _weighted_values(weights, value, precision)
    return out, log_rem  # [B, Q, K, G, Hv], [B, K, G, Q]

  def blocks(x, axis):  # split axis `axis` of length T + pad into [num_blocks, ..., block_q, ...]
    x = jnp.moveaxis(x, axis, 0).reshape(num_blocks, block_q, *x.shape[:axis], *x.shape[axis + 1:])
    return jnp.moveaxis(x, 1, axis + 1)

  xs = (blocks(q, 1), q_pos.reshape(num_blocks, block_q),
        None if q_seg is None else blocks(q_seg, 1))
  out, log_rem = jax.lax.map(one_block, xs)  # [C, B, Q, K, G, Hv], [C, B, K, G, Q]
  out = jnp.moveaxis(out, 0, 1).reshape(b, t + pad, n, hv)[:, :t]
  rem = jnp.exp(log_rem).transpose(1, 0, 4, 2, 3).reshape(b, t + pad, n)[:, :t]
  return out.astype(query.dtype), rem
