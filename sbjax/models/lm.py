"""``DecoderLM``: a decoder-only Transformer LM whose attention is chosen by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sbjax.models.config import LMConfig
from sbjax.nn import make_attention
from sbjax.nn.params import annotated_param
from sbjax.parallel import MODEL, shard_sequence


class SwiGLU(nnx.Module):
  """``x [B, T, D]`` -> ``(silu(x W_gate) * (x W_up)) W_down``; hidden units on ``"model"``."""

  def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    init = nnx.initializers.lecun_normal()
    self.gate_kernel = annotated_param(init, rngs, (d_model, mlp_dim), param_dtype, (None, MODEL))
    self.up_kernel = annotated_param(init, rngs, (d_model, mlp_dim), param_dtype, (None, MODEL))
    self.down_kernel = annotated_param(init, rngs, (mlp_dim, d_model), param_dtype, (MODEL, None))
    self.dtype = dtype

  def __call__(self, x):
    gate = jnp.einsum("BTD,DF->BTF", x, self.gate_kernel[...].astype(self.dtype))
    up = jnp.einsum("BTD,DF->BTF", x, self.up_kernel[...].astype(self.dtype))
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down_kernel[...].astype(self.dtype))


class DecoderBlock(nnx.Module):
  """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    options = dict(num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=dtype,
                   param_dtype=param_dtype)
    if c.attention == "stickbreaking":
      options.update(attend_current=c.attend_current, remainder=c.remainder,
                     head_norm=c.head_norm, norm_eps=c.norm_eps, forget_gate=c.forget_gate,
                     forget_gate_loss_weight=c.forget_gate_loss_weight,
                     implementation=c.implementation, block_sizes=c.block_sizes)
    else:
      options.update(implementation=c.softmax_implementation)
      if c.attention == "softmax_rope":
        options.update(rope_base=c.rope_base)
    norm = dict(epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = nnx.RMSNorm(c.d_model, **norm)
    self.attention = make_attention(c.attention, c.d_model, c.num_heads, rngs=rngs, **options)
    self.mlp_norm = nnx.RMSNorm(c.d_model, **norm)
    self.mlp = SwiGLU(c.d_model, c.mlp_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, segment_ids=None, positions=None, *, decode=False, prompt_lengths=None):
    x = x + self.attention(self.attention_norm(x), segment_ids, positions, decode=decode,
                           prompt_lengths=prompt_lengths)
    return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nnx.Module):
  """Token ids ``[B, T]`` -> next-token logits ``[B, T, V]`` (float32).

  Embedding ``[V, D]`` (vocabulary on ``"model"``), ``num_layers`` pre-norm ``DecoderBlock``s, a
  final RMSNorm and either the tied embedding or an output kernel ``[D, V]``. Compute runs in
  ``config.dtype`` with parameters in ``config.param_dtype``.
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    dtype, param_dtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    # std 1/sqrt(D): unit-RMS rows after the first RMSNorm, logits of order one when tied.
    embed_init = nnx.initializers.normal(c.d_model ** -0.5)
    self.embedding = annotated_param(embed_init, rngs, (c.vocab_size, c.d_model), param_dtype,
                                     (MODEL, None))
    self.blocks = nnx.List([DecoderBlock(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = nnx.RMSNorm(c.d_model, epsilon=c.norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.output_kernel = None if c.tie_embeddings else annotated_param(
        nnx.initializers.lecun_normal(), rngs, (c.d_model, c.vocab_size), param_dtype, (None, MODEL))

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    """An empty KV cache in every attention layer for ``batch_size`` rows of up to ``max_length``
    tokens, in ``dtype`` (default: the compute dtype). Then ``model(prompt, decode=True,
    prompt_lengths=...)`` and ``model(token [B, 1], decode=True)``; see ``sbjax.models.generate``."""
    dtype = jnp.dtype(dtype or self.config.dtype)
    for block in self.blocks:
      block.attention.init_cache((batch_size, max_length), dtype)

  def hidden_states(self, tokens, segment_ids=None, positions=None, *, decode=False,
                    prompt_lengths=None):
    """``tokens [B, T]`` -> the final-norm activations ``[B, T, D]`` in the compute dtype (the
    forward pass without the head: callers that score long sequences apply ``logits`` by chunks).
    ``decode`` and ``prompt_lengths`` as in ``__call__``."""
    x = self.embedding[...].astype(jnp.dtype(self.config.dtype))[tokens]  # [B, T, D]
    for block in self.blocks:
      if decode:  # no backward pass: nothing to rematerialise
        x = block(x, decode=True, prompt_lengths=prompt_lengths)
        continue
      x = shard_sequence(x)  # T over "context" between layers, under a mesh with that axis
      if self.config.remat:
        x = nnx.remat(lambda b, y: b(y, segment_ids, positions))(block, x)
      else:
        x = block(x, segment_ids, positions)
    return self.final_norm(x)

  def logits(self, x):
    """The head: ``x [B, T, D]`` -> ``[B, T, V]`` float32."""
    dtype = jnp.dtype(self.config.dtype)
    if self.output_kernel is None:
      logits = jnp.einsum("BTD,VD->BTV", x, self.embedding[...].astype(dtype))
    else:
      logits = jnp.einsum("BTD,DV->BTV", x, self.output_kernel[...].astype(dtype))
    return logits.astype(jnp.float32)

  def __call__(self, tokens, segment_ids=None, positions=None, *, decode=False,
               prompt_lengths=None):
    """Args: ``tokens [B, T]`` ints; optional ``segment_ids``, ``positions [B, T]``; ``decode``:
    use the KV caches (``init_cache`` first), appending ``tokens`` at each row's cache index;
    ``prompt_lengths [B]`` with ``decode``: this call is the prefill of right-padded prompts
    (the caches restart at 0 and each row's index is left at its prompt's length).

    Returns ``logits [B, T, V]`` in float32.
    """
    if decode and (segment_ids is not None or positions is not None):
      raise ValueError("decode=True takes positions from the cache index and no segment_ids.")
    return self.logits(self.hidden_states(tokens, segment_ids, positions, decode=decode,
                                          prompt_lengths=prompt_lengths))


def count_params(model: nnx.Module) -> int:
  """Number of parameters (works on an ``nnx.eval_shape``-built model too)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
