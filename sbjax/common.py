"""Pieces every implementation shares: dtypes, visibility masks, head grouping, the log-space stick."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

# Once a row's stick is below 2^SKIP_LOG2, every farther key's weight exp2(log2 beta + stick) is
# below 2^-152 and rounds to exactly 0 in fp32: stopping the walk there changes no bit of the result.
SKIP_LOG2 = -152.0


def stop_log2(skip_tolerance: float) -> float:
  """The log2-stick below which a kernel's walk stops: ``SKIP_LOG2`` (exact) for a tolerance of
  0, else ``log2(skip_tolerance)`` (farther keys then change the output by at most
  ``skip_tolerance * max|v|``)."""
  return max(math.log2(skip_tolerance), SKIP_LOG2) if skip_tolerance > 0 else SKIP_LOG2


def live_row_end(first, block_q, num_key_blocks, num_kv_heads):
  """``[B, K, num_key_blocks]``: rows past this never reach the key block (their stick is used up).

  ``first [B, N, num_row_blocks]`` is the leftmost key block each dq row block (``block_q`` rows)
  of a backward kernel walked. Row blocks that reach key block ``kb`` all lie before the first
  point from which every later row block stopped right of ``kb``: where the suffix minimum of
  ``first`` exceeds ``kb``.
  """
  suffix_min = jax.lax.cummin(first, axis=2, reverse=True)  # non-decreasing along row blocks
  reach = jnp.sum(suffix_min[..., None] <= jnp.arange(num_key_blocks), axis=2)  # [B, N, nkb]
  b, n, _ = first.shape
  reach = reach.reshape(b, num_kv_heads, n // num_kv_heads, num_key_blocks).max(axis=2)
  return (reach * block_q).astype(jnp.int32)


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype of the math and of ``rem``: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def visible_mask(q_pos, k_pos, q_seg=None, k_seg=None, *, attend_current: bool = False,
                 causal: bool = True):
  """Which keys each query sees: ``[Tq, Tk]`` bool from positions ``q_pos [Tq]``, ``k_pos [Tk]``.

  With segment ids ``q_seg [..., Tq]`` and ``k_seg [..., Tk]`` (any leading axes, e.g. ``[B]``;
  both or neither) the result is ``[..., Tq, Tk]``: keys of another segment are invisible.
  ``causal=False`` (the fully visible cross-chunk mode: keys of an earlier chunk) ignores
  positions: every key of the query's segment is visible.
  """
  rel = q_pos[:, None] - k_pos[None, :]
  if not causal:
    mask = jnp.ones(rel.shape, jnp.bool_)
  else:
    mask = rel >= 0 if attend_current else rel > 0
  if q_seg is not None:
    mask = mask & (q_seg[..., :, None] == k_seg[..., None, :])
  return mask


def split_heads(query, num_kv_heads: int):
  """``[B, T, N, H] -> [B, T, K, G, H]``: query head ``n`` reads kv head ``n // G``."""
  b, t, n, h = query.shape
  return query.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def reverse_cumsum(x):
  """Inclusive right-to-left cumulative sum over the last axis."""
  return jax.lax.cumsum(x, axis=x.ndim - 1, reverse=True)


def stick_breaking_weights(logits, mask, cumsum: Callable = reverse_cumsum, gate=None):
  """Attention weights and log-remainder of each row (docs/design.md §1), in log space.

  Args:
    logits: ``[..., Tq, Tk]`` scaled scores ``z``, float32 or wider.
    mask: bool, broadcastable to ``logits``; False marks invisible keys.
    cumsum: inclusive right-to-left cumulative sum over the last axis.
    gate: optional forget-gate logits ``g``, broadcastable to ``logits`` (one per key, e.g.
      ``[..., 1, Tk]``), same dtype: key ``i`` takes ``beta_ji = sigmoid(g_i) sigmoid(z_ji)``.

  Returns:
    ``(A [..., Tq, Tk], log_rem [..., Tq])``.
  """
  if gate is None:
    log_beta = jax.nn.log_sigmoid(logits)  # log sigmoid(z)
    log_1m_beta = -jax.nn.softplus(logits)  # log(1 - sigmoid(z))
  else:
    log_f = jax.nn.log_sigmoid(gate)  # log f
    log_beta = log_f + jax.nn.log_sigmoid(logits)
    # log(1 - f sigmoid(z)) = log((1 - f) + f (1 - sigmoid(z))): two non-positive log terms, so
    # saturated g or z lose nothing, and g = +inf gives -softplus(z) exactly (the ungated op).
    log_1m_beta = jnp.logaddexp(jax.nn.log_sigmoid(-gate), log_f + jax.nn.log_sigmoid(-logits))
  log_1m_beta = jnp.where(mask, log_1m_beta, 0.0)  # an invisible key leaves the stick unchanged
  incl = cumsum(log_1m_beta)  # sum over m >= i
  # The exclusive sum (m > i) is the inclusive one shifted left by one key: nothing is added and
  # subtracted again, so a saturated key (softplus ~ 1e4) costs no precision elsewhere.
  excl = jnp.concatenate([incl[..., 1:], jnp.zeros_like(incl[..., :1])], axis=-1)
  weights = jnp.where(mask, jnp.exp(log_beta + excl), 0.0)
  return weights, incl[..., 0]
