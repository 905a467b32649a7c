"""``StickBreakingAttention``: the Flax nnx module around ``sbjax.stick_breaking_attention``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sbjax.nn.projections import AttentionProjections, rms_norm_heads
from sbjax.ops import IMPLEMENTATIONS, stick_breaking_attention
from sbjax.parallel import MODEL, shard_attention

REMAINDERS = ("none", "current", "bias")


class StickBreakingAttention(AttentionProjections):
  """Causal multi-head stick-breaking attention (Tan et al., ICLR 2025); no position embedding.

  ``module(x, segment_ids=None)`` maps ``x [B, T, in_features]`` to ``[B, T, out_features]``:
  project to ``q [B, T, N, H]``, ``k, v [B, T, K, H]``, attend, optionally add the remainder and
  normalise each head, project back. The op runs inside ``jax.shard_map`` over ``("data",
  "model")`` when a mesh is set (``jax.set_mesh``), because the Pallas kernels are opaque to the
  partitioner.

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
    implementation: passed to the op: ``None`` (Pallas on an NVIDIA GPU, else ``"scan"``),
      ``"pallas"``, ``"scan"`` or ``"xla"``.
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
      implementation: str | None = None,
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
    super().__init__(
        in_features, num_heads, rngs=rngs, num_kv_heads=num_kv_heads, head_dim=head_dim,
        out_features=out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, bias_init=bias_init)
    self.attend_current, self.remainder, self.implementation = attend_current, remainder, implementation
    self.head_norm, self.norm_eps = head_norm, norm_eps
    shape, sharding = (self.num_heads, self.head_dim), (MODEL, None)
    self.remainder_bias = (
        nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), sharding)(
            rngs.params(), shape, param_dtype)) if remainder == "bias" else None)
    self.head_norm_scale = (
        nnx.Param(nnx.with_partitioning(nnx.initializers.ones_init(), sharding)(
            rngs.params(), shape, param_dtype)) if head_norm else None)

  def attend(self, query, key, value, segment_ids, positions):
    del positions  # order enters through the stick, not through positions
    def op(q, k, v, seg):
      return stick_breaking_attention(
          q, k, v, attend_current=self.attend_current, segment_ids=seg,
          return_remainder=True, implementation=self.implementation)

    out, rem = shard_attention(op, query, key, value, segment_ids)  # [B, T, N, H], [B, T, N]
    rem = rem.astype(out.dtype)[..., None]  # [B, T, N, 1]
    if self.remainder == "current":
      group = self.num_heads // self.num_kv_heads
      out = out + rem * value.repeat(group, axis=2)  # query head n reads kv head n // group
    elif self.remainder == "bias":
      out = out + rem * self.remainder_bias[...].astype(out.dtype)
    if self.head_norm:
      out = rms_norm_heads(out, self.head_norm_scale[...], self.norm_eps)
    return out
