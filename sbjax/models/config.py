"""``LMConfig``: the decoder LM's hyperparameters, and named sizes from tiny to ~350M."""

from __future__ import annotations

import dataclasses

from sbjax.kernels.pallas_triton_config import BlockSizes
from sbjax.nn import ATTENTIONS


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Decoder-only LM: pre-norm blocks of RMSNorm -> attention and RMSNorm -> SwiGLU MLP."""

  vocab_size: int = 256  # V
  num_layers: int = 2
  d_model: int = 64  # D
  num_heads: int = 4  # N
  num_kv_heads: int | None = None  # K; None = N
  head_dim: int | None = None  # H; None = D // N
  mlp_dim: int = 128  # F, SwiGLU hidden width
  attention: str = "stickbreaking"  # "stickbreaking" | "softmax_rope" | "softmax_nope"
  tie_embeddings: bool = True  # logits use the input embedding
  attend_current: bool = False  # stick-breaking only
  remainder: str = "none"  # stick-breaking only: "none" | "current" | "bias"
  head_norm: bool = False  # stick-breaking only: RMSNorm of each head's output
  forget_gate: bool = False  # stick-breaking only: beta_ji = sigmoid(g_i) sigmoid(z_ji), g from x
  forget_gate_loss_weight: float = 0.0  # auxiliary sparsity loss weight * mean(sigmoid(g))
  rope_base: float = 10000.0  # softmax_rope only
  implementation: str | None = None  # stick-breaking op: None (per backend) or sbjax.ops.IMPLEMENTATIONS
  block_sizes: BlockSizes | None = None  # stick-breaking Pallas kernels' tiling; None = defaults
  softmax_implementation: str | None = None  # softmax: None (cuDNN on GPU, else XLA) | "xla" | "cudnn"
  norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype ("bfloat16" for mixed precision)
  param_dtype: str = "float32"
  remat: bool = False  # rematerialise each block in the backward pass

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got attention={self.attention!r}.")

  def replace(self, **changes) -> LMConfig:
    return dataclasses.replace(self, **changes)


# Widths follow GPT-2/3 small and medium; F = 8/3 D rounded up to 256 keeps SwiGLU's parameter count
# at a 4D GELU MLP's; V = 50304 is GPT-2's vocabulary padded to a multiple of 128.
PRESETS = {
    "tiny": LMConfig(),
    "125m": LMConfig(vocab_size=50304, num_layers=12, d_model=768, num_heads=12, mlp_dim=2048),
    "350m": LMConfig(vocab_size=50304, num_layers=24, d_model=1024, num_heads=16, mlp_dim=2816),
}


def lm_config(name: str, **overrides) -> LMConfig:
  """The preset ``name`` (``"tiny"``, ``"125m"``, ``"350m"``) with fields replaced by ``overrides``."""
  if name not in PRESETS:
    raise ValueError(f"name must be one of {tuple(PRESETS)}, got {name=}.")
  return PRESETS[name].replace(**overrides)
