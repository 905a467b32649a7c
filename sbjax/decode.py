"""Stick-breaking attention for decoding: a few new queries against a KV cache, chunk by chunk.

The portable path (any backend) and the oracle of a decode kernel. The cache of each batch row is
split into chunks of ``chunk_size`` keys; each chunk is attended with a fresh stick and the chunks
are combined nearest first with the associative combine of docs/design.md §1,

    o = o_near + rem_near * o_far,      log rem = log rem_near + log rem_far,

under a ``lax.while_loop`` that stops as soon as every query of every row has used up its stick:
below ``2^-152`` (float32 math; ``2^-1080`` for float64) ``rem`` is exactly 0 in the compute dtype,
so the farther chunks would add exactly nothing and skipping them changes no bit of the result.
With ``skip_tolerance > 0`` the loop stops once ``rem < skip_tolerance``; the output then differs
from the full sum by at most ``rem * max|v| < skip_tolerance * max|v|`` over the unread keys.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sbjax.common import compute_dtype, split_heads, stick_breaking_weights

DEFAULT_CHUNK_SIZE = 256
# exp(log rem) is exactly 0 below these: exp underflows below ~2^-150 (fp32) and ~2^-1075 (fp64).
_EXACT_LOG2_THRESHOLD = {jnp.dtype(jnp.float32): -152.0, jnp.dtype(jnp.float64): -1080.0}


def log_skip_threshold(dtype, skip_tolerance: float) -> float:
  """``log`` of the stick below which a row stops reading the cache (``dtype``: the compute dtype)."""
  if skip_tolerance > 0:
    return math.log(skip_tolerance)
  return _EXACT_LOG2_THRESHOLD[jnp.dtype(dtype)] * math.log(2.0)


def stick_breaking_decode(
    query, key_cache, value_cache, cache_len, scale, forget_gate_cache=None, *,
    attend_current=False, chunk_size=None, skip_tolerance=0.0
):
  """Attention of ``Q`` new queries over a KV cache, nearest chunk first, skipping used-up sticks.

  Query ``j`` of row ``b`` sits at position ``p = cache_len[b] - Q + j`` (its key was appended
  already) and sees cache keys ``i < p`` (``i <= p`` with ``attend_current``); keys at and past
  ``cache_len[b]`` are never read. A query at a negative position sees nothing (``o = 0``,
  ``rem = 1``).

  Args:
    query: ``[B, Q, N, H]``.
    key_cache: ``[B, S, K, H]`` with ``N % K == 0``.
    value_cache: ``[B, S, K, Hv]``.
    cache_len: ``[B]`` integers in ``[0, S]``: the filled length of each row.
    scale: scalar multiplying ``q . k``.
    forget_gate_cache: optional ``[B, S, K]`` forget-gate logits of the cached keys.
    attend_current: whether query ``j`` also sees the key at its own position.
    chunk_size: keys per chunk (``min(chunk_size, S)``); default ``DEFAULT_CHUNK_SIZE``.
    skip_tolerance: 0 for exact skipping, ``> 0`` to stop a row once its stick is below it,
      ``None`` to read every chunk up to ``cache_len`` (no skipping).

  Returns:
    ``(out [B, Q, N, Hv] in query.dtype, rem [B, Q, N] in compute_dtype(query.dtype),
    keys_read [B] int32)``: ``keys_read`` counts the cache keys of each row inside the chunks that
    row needed (what a kernel with one program per row and chunk would read).
  """
  b, q_len, n, _ = query.shape
  s, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
  hv = value_cache.shape[-1]
  dtype = compute_dtype(query.dtype)
  chunk = min(chunk_size or DEFAULT_CHUNK_SIZE, s)
  # As in sbjax.scan: bf16/fp16 products are exact in fp32; fp32/fp64 get full-precision products.
  precision = jax.lax.Precision.HIGHEST if query.dtype in (jnp.float32, jnp.float64) else None
  q = split_heads(query, num_kv_heads)  # [B, Q, K, G, H]
  scale = jnp.asarray(scale, dtype)
  cache_len = jnp.asarray(cache_len, jnp.int32)
  q_pos = cache_len[:, None] - q_len + jnp.arange(q_len)  # [B, Q]
  last = jnp.floor_divide(cache_len - 1, chunk)  # [B] the nearest chunk; -1 for an empty row
  num_steps = jnp.max(last) + 1

  def done(log_rem):  # [B, K, G, Q] -> [B]: every query of the row has used up its stick
    if skip_tolerance is None:
      return jnp.zeros(log_rem.shape[:1], bool)
    return jnp.all(log_rem < log_skip_threshold(dtype, skip_tolerance), axis=(1, 2, 3))

  take = jax.vmap(lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, chunk, axis=0))

  def body(carry):
    step, out, log_rem, keys_read = carry
    start = (last - step) * chunk  # [B] this row's chunk, negative once the row is exhausted
    active = (start >= 0) & ~done(log_rem)  # [B]
    # Slices stay in bounds (the last chunk may overlap its neighbour); keys outside the row's own
    # chunk are masked, so a key is counted once.
    lo = jnp.clip(start, 0, s - chunk)
    k_pos = lo[:, None] + jnp.arange(chunk)  # [B, C]
    in_chunk = (k_pos >= start[:, None]) & (k_pos < start[:, None] + chunk)  # [B, C]
    rel = q_pos[:, :, None] - k_pos[:, None, :]  # [B, Q, C]
    mask = (rel >= 0 if attend_current else rel > 0) & in_chunk[:, None, :] & active[:, None, None]
    key, value = take(key_cache, lo), take(value_cache, lo)  # [B, C, K, H], [B, C, K, Hv]
    logits = jnp.einsum("BQKGH,BCKH->BKGQC", q, key, precision=precision,
                        preferred_element_type=dtype)
    gate = None
    if forget_gate_cache is not None:
      gate = jnp.einsum("BCK->BKC", take(forget_gate_cache, lo).astype(dtype))[:, :, None, None]
    weights, chunk_log_rem = stick_breaking_weights(  # [B, K, G, Q, C], [B, K, G, Q]
        logits * scale, mask[:, None, None], gate=gate)
    chunk_out = jnp.einsum("BKGQC,BCKH->BKGQH", weights.astype(value.dtype), value,
                           precision=precision, preferred_element_type=dtype)
    out = out + jnp.exp(log_rem)[..., None] * chunk_out  # the combine: this chunk is the far part
    log_rem = log_rem + chunk_log_rem
    keys_read = keys_read + jnp.where(active, jnp.minimum(chunk, cache_len - start), 0)
    return step + 1, out, log_rem, keys_read

  def cond(carry):
    step, _, log_rem, _ = carry
    return (step < num_steps) & ~jnp.all(done(log_rem))

  g = n // num_kv_heads
  init = (jnp.int32(0), jnp.zeros((b, num_kv_heads, g, q_len, hv), dtype),
          jnp.zeros((b, num_kv_heads, g, q_len), dtype), jnp.zeros((b,), jnp.int32))
  _, out, log_rem, keys_read = jax.lax.while_loop(cond, body, init)
  out = jnp.einsum("BKGQH->BQKGH", out).reshape(b, q_len, n, hv)
  rem = jnp.einsum("BKGQ->BQKG", jnp.exp(log_rem)).reshape(b, q_len, n)
  return out.astype(query.dtype), rem, keys_read
