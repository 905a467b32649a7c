"""``StickBreakingAttention``: the Flax nnx module around ``sbjax.stick_breaking_attention``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sbjax import context_parallel
from sbjax.kernels.pallas_triton_config import BlockSizes
from sbjax.nn.params import annotated_param
from sbjax.nn.projections import AttentionProjections, rms_norm_heads
from sbjax.ops import IMPLEMENTATIONS, stick_breaking_attention, stick_breaking_decode
from sbjax.parallel import MODEL, context_size, shard_attention

_PALLAS = ("pallas", "pallas_triton", "pallas_mosaic_gpu")

REMAINDERS = ("none", "current", "bias")


class StickBreakingAttention(AttentionProjections):
  """Causal multi-head stick-breaking attention (Tan et al., ICLR 2025); no position embedding.

  ``module(x, segment_ids=None)`` maps ``x [B, T, in_features]`` to ``[B, T, out_features]``:
  project to ``q [B, T, N, H]``, ``k, v [B, T, K, H]``, attend, optionally add the remainder and
  normalise each head, project back.

  Decoding, as ``nnx.MultiHeadAttention``: ``module.init_cache((B, S, D))``, then
  ``module(prompt, decode=True, prompt_lengths=lengths)`` (the prefill, through the training op)
  and ``module(x_step [B, 1, D], decode=True)`` per step (``sbjax.stick_breaking_decode`` over the
  cache). Keys, values and the forget gate's logits are cached; the index is per row. A step past
  the cache's end raises when called eagerly and gives NaN rows under ``jit``. The op runs inside
  ``jax.shard_map`` over ``("data", "model")`` when a mesh is set (``jax.set_mesh``), because the
  Pallas kernels are opaque to the partitioner; with a ``"context"`` axis larger than 1 the
  sequence is split over it too (``sbjax.context_parallel``: each shard's queries against its
  own keys and every earlier shard's, combined by the chunk combine).

  Args:
    in_features: ``D``, the width of ``x``.
    num_heads: ``N``, query heads.
    rngs: ``nnx.Rngs`` for the parameters.
    num_kv_heads: ``K`` key/value heads (GQA/MQA), must divide ``N``; default ``N``.
    head_dim: ``H``; default ``in_features // num_heads``.
    out_features: width of the output; default ``in_features``.
    use_bias: biases on the four projections.
    attend_current: query ``j`` also sees key ``j``.
    remainder: what to do with the unbroken stick ``rem [B, T, N]``: ``"none"``; ``"current"``
      adds ``rem * v_j`` (the current token's value, through its kv head); ``"bias"`` adds
      ``rem * b`` with a learned per-head ``b [N, H]`` (initialised to zero).
    head_norm: RMSNorm of each head's output over ``H`` (learned scale ``[N, H]``) before the
      output projection.
    norm_eps: epsilon of that RMSNorm.
    forget_gate: the slides' forget gate: ``beta_ji = f_i * sigmoid(z_ji)`` with
      ``f = sigmoid(x W_f + b_f) [B, T, K]`` computed on the key side (learned ``W_f [D, K]``,
      initialised to zero, and ``b_f [K]``), so a key can opt out of every query's stick.
    forget_gate_bias_init: initial ``b_f``; the default 4.0 starts every gate at
      ``sigmoid(4) = 0.98``, close to the ungated op.
    forget_gate_loss_weight: with ``forget_gate``, the auxiliary sparsity loss
      ``weight * mean(f)`` is sown as ``nnx.Intermediate`` named ``"aux_loss"`` (0: not sown);
      ``sbjax.training`` adds every sown ``aux_loss`` to the training loss.
    implementation: passed to the op: ``None`` (Pallas on an NVIDIA GPU, else ``"scan"``),
      ``"pallas"``, ``"pallas_triton"``, ``"pallas_mosaic_gpu"`` (forward only), ``"scan"`` or
      ``"xla"``.
    block_sizes: a ``sbjax.BlockSizes`` for the Pallas kernels (``None``: per head dim and dtype).
    decode_chunk_size: ``chunk_size`` of ``sbjax.stick_breaking_decode`` in decode steps
      (its ``"xla"`` path).
    decode_skip_tolerance: its ``skip_tolerance`` (0: exact skipping; None: read every chunk).
      Decode steps use the decode kernel for the Pallas implementations, the portable path
      for ``"scan"``/``"xla"``, and the op's default for ``None``.
    interpret: run the Pallas kernels (training and decode) in interpret mode (tests; slow).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); default: promote ``x`` and the parameters.
    param_dtype: parameter dtype.
    kernel_init: initialiser of the projection kernels; default LeCun normal over the
      contracted axes.
    bias_init: initialiser of the projection biases.
  """

  def __init__(
      self,
      in_features: int,
      num_heads: int,
      *,
      rngs: nnx.Rngs,
      num_kv_heads: int | None = None,
      head_dim: int | None = None,
      out_features: int | None = None,
      use_bias: bool = False,
      attend_current: bool = False,
      remainder: str = "none",
      head_norm: bool = False,
      norm_eps: float = 1e-6,
      forget_gate: bool = False,
      forget_gate_bias_init: float = 4.0,
      forget_gate_loss_weight: float = 0.0,
      implementation: str | None = None,
      block_sizes: BlockSizes | None = None,
      decode_chunk_size: int | None = None,
      decode_skip_tolerance: float | None = 0.0,
      interpret: bool = False,
      dtype=None,
      param_dtype=jnp.float32,
      kernel_init=None,
      bias_init=nnx.initializers.zeros_init(),
  ):
    if remainder not in REMAINDERS:
      raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder=}.")
    if implementation is not None and implementation not in IMPLEMENTATIONS:
      raise ValueError(
          f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation=}.")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
      raise TypeError(f"block_sizes must be None or a sbjax.BlockSizes, got {block_sizes!r}.")
    if decode_chunk_size is not None and (not isinstance(decode_chunk_size, int)
                                          or isinstance(decode_chunk_size, bool)
                                          or decode_chunk_size < 1):
      raise ValueError(f"decode_chunk_size must be None or a positive int, got {decode_chunk_size=}.")
    if decode_skip_tolerance is not None and not (
        isinstance(decode_skip_tolerance, (int, float)) and 0 <= decode_skip_tolerance < 1):
      raise ValueError(
          f"decode_skip_tolerance must be None or a float in [0, 1), got {decode_skip_tolerance=}.")
    if interpret and implementation not in _PALLAS:
      raise ValueError(f"interpret applies to the Pallas implementations {_PALLAS} only, got "
                       f"{implementation=}.")
    if not forget_gate_loss_weight >= 0:
      raise ValueError(f"forget_gate_loss_weight must be >= 0, got {forget_gate_loss_weight=}.")
    if forget_gate_loss_weight and not forget_gate:
      raise ValueError("forget_gate_loss_weight needs forget_gate=True, got "
                       f"{forget_gate_loss_weight=} with {forget_gate=}.")
    super().__init__(
        in_features, num_heads, rngs=rngs, num_kv_heads=num_kv_heads, head_dim=head_dim,
        out_features=out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, bias_init=bias_init)
    self.attend_current, self.remainder, self.implementation = attend_current, remainder, implementation
    self.block_sizes = block_sizes
    self.decode_chunk_size, self.decode_skip_tolerance = decode_chunk_size, decode_skip_tolerance
    self.interpret = interpret
    self.cached_gate: nnx.Cache | None = nnx.data(None)  # [B, S, K] float32 forget-gate logits
    self.head_norm, self.norm_eps = head_norm, norm_eps
    self.forget_gate_loss_weight = forget_gate_loss_weight
    per_head = lambda init: annotated_param(
        init, rngs, (self.num_heads, self.head_dim), param_dtype, (MODEL, None))
    self.remainder_bias = per_head(nnx.initializers.zeros_init()) if remainder == "bias" else None
    self.head_norm_scale = per_head(nnx.initializers.ones_init()) if head_norm else None
    # Attributes are assigned once (None or a Param): nnx fixes an attribute's kind on first use.
    self.forget_kernel = annotated_param(  # zero: every key starts with f = sigmoid(bias)
        nnx.initializers.zeros_init(), rngs, (self.in_features, self.num_kv_heads), param_dtype,
        (None, MODEL)) if forget_gate else None
    self.forget_bias = annotated_param(
        nnx.initializers.constant(forget_gate_bias_init), rngs, (self.num_kv_heads,), param_dtype,
        (MODEL,)) if forget_gate else None

  def forget_gate_logits(self, x):
    """``g [B, T, K]`` (float32) from ``x [B, T, D]``, or None without a forget gate."""
    if self.forget_kernel is None:
      return None
    # The gate's logits in fp32 whatever the compute dtype: sigmoid(g) multiplies every beta.
    g = jnp.einsum("BTD,DK->BTK", x.astype(jnp.float32), self.forget_kernel[...].astype(jnp.float32))
    g = g + self.forget_bias[...].astype(jnp.float32)
    if self.forget_gate_loss_weight:
      self.sow(nnx.Intermediate, "aux_loss",
               self.forget_gate_loss_weight * jnp.mean(jax.nn.sigmoid(g)))
    return g

  def attend(self, query, key, value, segment_ids, positions, inputs):
    del positions  # order enters through the stick, not through positions
    gate = self.forget_gate_logits(inputs)  # [B, T, K] or None

    def op(q, k, v, seg, gate):
      return stick_breaking_attention(
          q, k, v, attend_current=self.attend_current, segment_ids=seg, forget_gate=gate,
          return_remainder=True, implementation=self.implementation, block_sizes=self.block_sizes,
          interpret=self.interpret)

    if context_size() > 1:  # T over "context": the chunk combine across shards
      out, rem = context_parallel.stick_breaking_attention(
          query, key, value, attend_current=self.attend_current, segment_ids=segment_ids,
          forget_gate=gate, return_remainder=True, implementation=self.implementation,
          block_sizes=self.block_sizes, interpret=self.interpret)
    else:
      out, rem = shard_attention(op, query, key, value, segment_ids, gate)  # [B, T, N, H], [B, T, N]
    return self.finish(out, rem, value)

  def init_cache(self, input_shape, dtype=jnp.float32):
    """An empty cache for ``input_shape = (B, S, ...)``: keys, values and (with the forget gate)
    the gate's float32 logits ``[B, S, K]``, and the per-row index ``[B]``."""
    super().init_cache(input_shape, dtype)
    if self.forget_kernel is not None:
      self.cached_gate = nnx.Cache(jnp.zeros(self.cached_key.shape[:3], jnp.float32))

  def attend_cached(self, query, key, value, inputs, prompt_lengths):
    gate = self.forget_gate_logits(inputs)  # [B, T, K] or None
    t = query.shape[1]
    start, cache_len, overflow = self.advance_cache(t, prompt_lengths)
    self.write_cache(self.cached_key, key, start)
    self.write_cache(self.cached_value, value, start)
    if gate is not None:
      self.write_cache(self.cached_gate, gate, start)
    if prompt_lengths is not None:  # the prefill: the training op over the (right-padded) prompt
      out, rem = stick_breaking_attention(
          query, key, value, attend_current=self.attend_current, forget_gate=gate,
          return_remainder=True, implementation=self.implementation, block_sizes=self.block_sizes,
          interpret=self.interpret)
    else:
      implementation = None if self.implementation is None else (
          "pallas" if self.implementation in _PALLAS else "xla")
      out, rem = stick_breaking_decode(
          query, self.cached_key[...], self.cached_value[...], cache_len,
          forget_gate_cache=None if gate is None else self.cached_gate[...],
          attend_current=self.attend_current, return_remainder=True,
          implementation=implementation, interpret=self.interpret,
          chunk_size=self.decode_chunk_size, skip_tolerance=self.decode_skip_tolerance)
    out = jnp.where(overflow[:, None, None, None], jnp.nan, out)  # loud: tokens past the cache
    return self.finish(out, rem, value)

  def finish(self, out, rem, value):
    """The remainder and head norm on ``out [B, T, N, H]`` with ``rem [B, T, N]``."""
    rem = rem.astype(out.dtype)[..., None]  # [B, T, N, 1]
    if self.remainder == "current":
      group = self.num_heads // self.num_kv_heads
      out = out + rem * value.repeat(group, axis=2)  # query head n reads kv head n // group
    elif self.remainder == "bias":
      out = out + rem * self.remainder_bias[...].astype(out.dtype)
    if self.head_norm:
      out = rms_norm_heads(out, self.head_norm_scale[...], self.norm_eps)
    return out
