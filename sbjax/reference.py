"""Dense O(T^2) stick-breaking attention: the readable definition and the test oracle.

It is implementation ``"xla"`` of :func:`sbjax.stick_breaking_attention`: logits, the log-space
stick of docs/design.md §1, then a weighted sum, in at least float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sbjax.common import compute_dtype, split_heads, stick_breaking_weights, visible_mask

_HIGHEST = jax.lax.Precision.HIGHEST


def stick_breaking_attention(
    query, key, value, scale, segment_ids=None, forget_gate=None, *, attend_current=False,
    dtype=None, causal=True, key_segment_ids=None
):
  """Dense stick-breaking attention.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, T, K, H]`` with ``N % K == 0``.
    value: ``[B, T, K, Hv]``.
    scale: scalar multiplying ``q . k``.
    segment_ids: optional ``[B, T]`` integers.
    forget_gate: optional ``[B, T, K]`` logits ``g``: key ``i`` of kv head ``k`` takes
      ``sigmoid(g_ik) * sigmoid(z_ji)`` of the stick.
    attend_current: whether query ``j`` also sees key ``j``.
    dtype: dtype of the math and of ``rem``; defaults to ``compute_dtype(query.dtype)`` (float32 or
      wider). Tests pass the input dtype to measure what a same-precision computation gets wrong.
    causal: False is the fully visible cross-chunk mode (docs/design.md §1, chunk combine): the
      queries attend to an earlier chunk of keys, every key visible (``attend_current`` ignored),
      with a fresh stick broken from the chunk's last key leftwards. ``segment_ids`` are then the
      queries' and ``key_segment_ids`` the keys' (both or neither).

  Returns:
    ``(out [B, T, N, Hv] in query.dtype, rem [B, T, N] in dtype)``.
  """
  b, t, n, _ = query.shape
  dtype = dtype or compute_dtype(query.dtype)
  weights, log_rem = _weights(query, key, scale, segment_ids, forget_gate, attend_current, dtype,
                              causal, key_segment_ids)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", weights, value.astype(dtype), precision=_HIGHEST)
  rem = jnp.exp(log_rem).transpose(0, 3, 1, 2).reshape(b, t, n)
  return out.reshape(b, t, n, value.shape[-1]).astype(query.dtype), rem


def attention_weights(query, key, scale, segment_ids=None, forget_gate=None, *,
                      attend_current=False, dtype=None):
  """The weights ``A [B, N, T, S]`` (``S = T`` keys) that :func:`stick_breaking_attention` applies
  to the values, in ``dtype`` (default ``compute_dtype(query.dtype)``); arguments as there. Query
  head ``n`` reads kv head ``n // (N // K)``; each row sums to ``1 - rem``."""
  b, t, n, _ = query.shape
  weights, _ = _weights(query, key, scale, segment_ids, forget_gate, attend_current,
                        dtype or compute_dtype(query.dtype))
  return weights.reshape(b, n, t, t)


def _weights(query, key, scale, segment_ids, forget_gate, attend_current, dtype, causal=True,
             key_segment_ids=None):
  """``(A [B, K, G, T, S], log rem [B, K, G, T])``."""
  t = query.shape[1]
  q = split_heads(query, key.shape[2]).astype(dtype)  # [B, T, K, G, H]
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key.astype(dtype), precision=_HIGHEST)
  logits = logits * jnp.asarray(scale, dtype)
  pos = jnp.arange(t)
  seg = None if segment_ids is None else segment_ids[:, None, None]  # [B, 1, 1, T]
  k_seg = seg if causal or seg is None else key_segment_ids[:, None, None]  # [B, 1, 1, S]
  mask = visible_mask(pos, jnp.arange(key.shape[1]), seg, k_seg, attend_current=attend_current,
                      causal=causal)  # [B, 1, 1, T, S] or [T, S]
  gate = None
  if forget_gate is not None:
    gate = jnp.einsum("BSK->BKS", forget_gate.astype(dtype))[:, :, None, None, :]  # [B, K, 1, 1, S]
  return stick_breaking_weights(logits, mask, gate=gate)  # [B, K, G, T, S], [B, K, G, T]
