"""``SoftmaxAttention``: the causal softmax baselines (RoPE or NoPE) through
``jax.nn.dot_product_attention`` (cuDNN flash attention on an NVIDIA GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sbjax.nn.projections import AttentionProjections
from sbjax.nn.rope import apply_rope
from sbjax.parallel import context_size, shard_attention, shard_attention_gathered
from sbjax.platform import on_nvidia_gpu

POSITION_EMBEDDINGS = ("rope", "none")
SOFTMAX_IMPLEMENTATIONS = ("xla", "cudnn")


def default_softmax_implementation() -> str:
  """cuDNN on an NVIDIA GPU (``jax.nn.dot_product_attention`` itself defaults to XLA), else XLA."""
  return "cudnn" if on_nvidia_gpu() else "xla"


class SoftmaxAttention(AttentionProjections):
  """Causal multi-head softmax attention with RoPE (``position_embedding="rope"``) or none (NoPE).

  Same interface as ``StickBreakingAttention``: ``module(x, segment_ids=None, positions=None)``
  maps ``x [B, T, in_features]`` to ``[B, T, out_features]``. ``positions [B, T]`` default to
  ``0..T-1``; RoPE is relative, so packed segments need no per-segment positions.

  Under a mesh with a ``"context"`` axis larger than 1, each context shard's queries (rotated at
  their global positions) attend to the all-gathered keys and values with an explicit causal
  mask, through the XLA implementation (``sbjax.parallel.shard_attention_gathered``).

  Decoding as ``StickBreakingAttention`` (``init_cache``, ``decode=True``, ``prompt_lengths``): the
  cache holds keys already rotated at their positions; a step's queries are rotated at their
  cache index and attend through ``jax.nn.dot_product_attention`` with a length mask.

  Args (beyond ``AttentionProjections``: in_features, num_heads, rngs, num_kv_heads, head_dim,
  out_features, use_bias, dtype, param_dtype, kernel_init, bias_init):
    position_embedding: ``"rope"`` or ``"none"``.
    rope_base: RoPE wavelength base.
    implementation: ``jax.nn.dot_product_attention``'s: ``None`` (``"cudnn"`` on an NVIDIA GPU,
      else ``"xla"``), ``"xla"`` or ``"cudnn"``.
  """

  def __init__(
      self,
      in_features: int,
      num_heads: int,
      *,
      rngs: nnx.Rngs,
      position_embedding: str = "rope",
      rope_base: float = 10000.0,
      implementation: str | None = None,
      **kwargs,
  ):
    if position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(
          f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding=}.")
    if implementation is not None and implementation not in SOFTMAX_IMPLEMENTATIONS:
      raise ValueError(
          f"implementation must be None or one of {SOFTMAX_IMPLEMENTATIONS}, got {implementation=}.")
    super().__init__(in_features, num_heads, rngs=rngs, **kwargs)
    if position_embedding == "rope" and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got head_dim={self.head_dim}.")
    self.position_embedding, self.rope_base = position_embedding, rope_base
    self.implementation = implementation

  def attend(self, query, key, value, segment_ids, positions, inputs):
    del inputs
    if self.position_embedding == "rope":
      if positions is None:
        positions = jnp.arange(query.shape[1])
      query = apply_rope(query, positions, base=self.rope_base)
      key = apply_rope(key, positions, base=self.rope_base)
    implementation = self.implementation or default_softmax_implementation()

    if context_size() > 1:  # T over "context": each shard's queries against the gathered K/V
      def gathered(q, k, v, q_seg, k_seg, q_start):
        q_pos = q_start + jnp.arange(q.shape[1])  # global positions of this shard's queries
        mask = (q_pos[:, None] >= jnp.arange(k.shape[1])[None, :])[None, None]  # [1, 1, T/C, T]
        if q_seg is not None:
          mask = mask & (q_seg[:, None, :, None] == k_seg[:, None, None, :])  # [B, 1, T/C, T]
        # An explicit mask of a query chunk: the XLA implementation (cuDNN's fused kernel wants a
        # causal or padding mask).
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

      return shard_attention_gathered(gathered, query, key, value, segment_ids)

    def op(q, k, v, seg, _):
      mask = None if seg is None else (seg[:, None, :, None] == seg[:, None, None, :])  # [B,1,T,S]
      return jax.nn.dot_product_attention(
          q, k, v, mask=mask, is_causal=True, implementation=implementation)

    return shard_attention(op, query, key, value, segment_ids)

  def attend_cached(self, query, key, value, inputs, prompt_lengths):
    del inputs
    b, t = query.shape[:2]
    start, cache_len, overflow = self.advance_cache(t, prompt_lengths)
    if self.position_embedding == "rope":  # the cache holds rotated keys, each at its position
      positions = start[:, None] + jnp.arange(t)  # [B, T]
      query = apply_rope(query, positions, base=self.rope_base)
      key = apply_rope(key, positions, base=self.rope_base)
    self.write_cache(self.cached_key, key, start)
    self.write_cache(self.cached_value, value, start)
    if prompt_lengths is not None:  # the prefill: the training path over the (right-padded) prompt
      implementation = self.implementation or default_softmax_implementation()
      out = jax.nn.dot_product_attention(query, key, value, is_causal=True,
                                         implementation=implementation)
    else:
      s = self.cached_key.shape[1]
      q_pos = cache_len[:, None] - t + jnp.arange(t)  # [B, T]
      mask = jnp.arange(s)[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
      # XLA's implementation: cuDNN's fused kernel wants a causal or padding mask, not this one.
      out = jax.nn.dot_product_attention(
          query, self.cached_key[...].astype(query.dtype), self.cached_value[...].astype(query.dtype),
          mask=mask[:, None], implementation="xla")
    return jnp.where(overflow[:, None, None, None], jnp.nan, out)  # loud: tokens past the cache
