"""Where a trained MQRAR model's attention goes: per-layer weights and the recency share.

The paper's claim is that stick-breaking attends to the MOST RECENT earlier occurrence of a
repeated key, where softmax spreads its weight over all of them. ``recency_sums`` measures it: at
each query (a key position whose key was assigned at least twice before), of the weight a head
puts on that key's earlier assignments (the pairs ``key value`` naming the same key; both of
their positions count), the share on the most recent assignment.

    attention_weights(model, tokens [B, T]) -> [L, B, N, T, S]
    recency_sums(weights [..., B, N, T, S], tokens [B, T]) -> dict of [..., N] sums
    recency_summary(sums) -> {"share", "match", "uniform"} per layer and head
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import sbjax
from sbjax.nn import SoftmaxAttention, StickBreakingAttention, apply_rope


def _layer_weights(attention, h):
  """The weights ``[B, N, T, S]`` that ``attention`` applies to the values for inputs
  ``h [B, T, D]`` (already normed): its own projections, position embedding, scale and mask."""
  kernels = (attention.query_kernel, attention.key_kernel)
  wq, wk = (w[...].astype(h.dtype) for w in kernels)
  query = jnp.einsum("BTD,DNH->BTNH", h, wq)
  key = jnp.einsum("BTD,DKH->BTKH", h, wk)
  if attention.use_bias:
    query = query + attention.query_bias[...].astype(h.dtype)
    key = key + attention.key_bias[...].astype(h.dtype)
  t, num_kv_heads = h.shape[1], key.shape[2]
  dtype = jnp.promote_types(h.dtype, jnp.float32)
  if isinstance(attention, StickBreakingAttention):
    if attention.forget_kernel is not None:
      raise ValueError("attention_weights does not support the forget gate (forget_gate=True).")
    # The op's default scale, 1/sqrt(H), as the module uses it.
    return sbjax.stick_breaking_weights(query.astype(dtype), key.astype(dtype),
                                        attend_current=attention.attend_current)
  if not isinstance(attention, SoftmaxAttention):
    raise TypeError(f"attention must be a SoftmaxAttention or StickBreakingAttention, got "
                    f"{type(attention).__name__}.")
  pos = jnp.arange(t)
  if attention.position_embedding == "rope":
    query = apply_rope(query, pos, base=attention.rope_base)
    key = apply_rope(key, pos, base=attention.rope_base)
  key = jnp.repeat(key, query.shape[2] // num_kv_heads, axis=2)  # query head n reads n // G
  # jax.nn.dot_product_attention's scale, 1/sqrt(H), and its float32 softmax; is_causal: i <= j.
  logits = jnp.einsum("BTNH,BSNH->BNTS", query.astype(dtype), key.astype(dtype),
                      precision=jax.lax.Precision.HIGHEST)
  logits = logits / jnp.sqrt(jnp.asarray(query.shape[-1], dtype))
  causal = pos[None, :] <= pos[:, None]
  weights = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf).astype(jnp.float32), axis=-1)
  return weights.astype(dtype)  # [B, N, T, S]


def attention_weights(model, tokens):
  """Every layer's attention weights on ``tokens [B, T]`` -> ``[L, B, N, T, S]`` (float32 or
  wider): row ``(l, b, n, j)`` is how much query ``j`` of head ``n`` in layer ``l`` takes from
  each position's value (softmax rows sum to 1; stick-breaking rows to 1 minus the remainder).

  ``model`` is a ``sbjax.models.DecoderLM``; the blocks are run as they are, so layer ``l`` sees
  the activations the trained model computes.
  """
  x = model.embedding[...].astype(jnp.dtype(model.config.dtype))[tokens]  # [B, T, D]
  layers = []
  for block in model.blocks:
    layers.append(_layer_weights(block.attention, block.attention_norm(x)))
    x = block(x)
  return jnp.stack(layers)


def assignment_masks(tokens):
  """Which source positions are the queried key's earlier assignments, at each key position.

  Args:
    tokens: ``[B, T]`` interleaved key-value pairs.

  Returns:
    ``(recent, older, n_prev)``: ``recent`` and ``older`` ``[B, P, T]`` bool (``P = T / 2``
    queries, one per key position ``2p``): the positions (key and value) of the most recent
    earlier pair with the same key, and of the older ones; ``n_prev [B, P]`` counts those pairs.
  """
  keys = tokens[:, 0::2]  # [B, P]
  p = keys.shape[-1]
  pair = jnp.arange(p)
  earlier = (keys[:, :, None] == keys[:, None, :]) & (pair[None, :] < pair[:, None])  # [B, Pq, Pk]
  last = jnp.max(jnp.where(earlier, pair, -1), axis=-1, keepdims=True)  # [B, Pq, 1]
  recent = earlier & (pair == last)
  older = earlier & ~recent
  expand = lambda m: jnp.repeat(m, 2, axis=-1)  # a pair's key and value positions
  return expand(recent), expand(older), earlier.sum(-1)


def recency_sums(weights, tokens) -> dict:
  """Sums over the eligible queries of ``tokens`` (key positions whose key has at least two
  earlier assignments) of where each head's weight goes.

  Args:
    weights: ``[..., B, N, T, S]`` (e.g. ``[L, B, N, T, S]`` from ``attention_weights``).
    tokens: ``[B, T]``.

  Returns:
    ``{"recent", "older", "uniform", "queries"}``, each ``[..., N]`` except the last two
    (scalars): the weight on the most recent earlier assignment, on the older ones, the sum of
    ``1 / n_prev`` (what ``recent`` would be per unit of key-match weight spread evenly over the
    key's assignments), and the number of queries. Sums, so batches and runs add up.
  """
  recent, older, n_prev = assignment_masks(tokens)
  eligible = n_prev >= 2  # with one earlier assignment, "most recent" decides nothing
  w = weights[..., 0::2, :]  # [..., B, N, P, S]: the queries sit at key positions
  keep = eligible[:, None, :, None]  # [B, 1, P, 1]
  total = lambda m: jnp.sum(jnp.where(keep & m[:, None], w, 0.0), axis=(-4, -2, -1))
  return {"recent": total(recent), "older": total(older),
          "uniform": jnp.sum(jnp.where(eligible, 1.0 / jnp.maximum(n_prev, 1), 0.0)),
          "queries": jnp.sum(eligible)}


def recency_summary(sums: dict) -> dict:
  """``share`` (the recent weight over the key-match weight), ``match`` (the key-match weight per
  query: near 1 for a head that retrieves by key) per layer and head, and ``uniform`` (the share
  of a head spreading its key-match weight evenly over the key's assignments); NumPy float64."""
  recent, older = (np.asarray(sums[k], np.float64) for k in ("recent", "older"))
  queries = max(float(sums["queries"]), 1.0)
  with np.errstate(invalid="ignore", divide="ignore"):  # a head with no key-match weight: NaN
    share = recent / (recent + older)
  return {"share": share, "match": (recent + older) / queries,
          "uniform": float(sums["uniform"]) / queries}
