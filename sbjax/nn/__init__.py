"""Flax nnx attention modules: stick-breaking attention and the softmax baselines.

Public API (stable):

    StickBreakingAttention(in_features, num_heads, *, rngs, num_kv_heads=None, head_dim=None,
        out_features=None, use_bias=False, attend_current=False, remainder="none"|"current"|"bias",
        head_norm=False, norm_eps=1e-6, forget_gate=False, forget_gate_bias_init=4.0,
        forget_gate_loss_weight=0.0, implementation=None, block_sizes=None, dtype=None,
        param_dtype=jnp.float32)
    SoftmaxAttention(in_features, num_heads, *, rngs, position_embedding="rope"|"none",
        rope_base=10000.0, implementation=None|"xla"|"cudnn", <same projection options>)
    module(x [B, T, D], segment_ids=None [B, T], positions=None [B, T]) -> [B, T, out_features]
    apply_rope(x [B, T, N, H], positions [B, T] | [T], *, base=10000.0) -> [B, T, N, H]
    make_attention(name, in_features, num_heads, *, rngs, **options)
        name: "stickbreaking" | "softmax_rope" | "softmax_nope"

Modules build anywhere, as ``nnx.MultiHeadAttention`` does. Parameters carry sharding
annotations (heads on the "model" mesh axis), applied when built under ``jax.set_mesh(mesh)`` with
that axis; ``sbjax.training`` places them on its own mesh either way.

    default_softmax_implementation() -> "cudnn" on an NVIDIA GPU, else "xla"
"""

from sbjax.nn.projections import AttentionProjections
from sbjax.nn.rope import apply_rope
from sbjax.nn.softmax import SoftmaxAttention, default_softmax_implementation
from sbjax.nn.stick_breaking import StickBreakingAttention

ATTENTIONS = ("stickbreaking", "softmax_rope", "softmax_nope")


def make_attention(name: str, in_features: int, num_heads: int, *, rngs, **options):
  """The attention module called ``name`` (one of ``ATTENTIONS``) with its options."""
  if name == "stickbreaking":
    return StickBreakingAttention(in_features, num_heads, rngs=rngs, **options)
  if name in ("softmax_rope", "softmax_nope"):
    return SoftmaxAttention(
        in_features, num_heads, rngs=rngs,
        position_embedding="rope" if name == "softmax_rope" else "none", **options)
  raise ValueError(f"attention must be one of {ATTENTIONS}, got {name!r}.")


__all__ = [
    "ATTENTIONS", "AttentionProjections", "SoftmaxAttention", "StickBreakingAttention",
    "apply_rope", "default_softmax_implementation", "make_attention",
]
