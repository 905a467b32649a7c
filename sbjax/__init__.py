"""sbjax: stick-breaking attention for JAX and Flax."""

from sbjax.nn.stick_breaking import StickBreakingAttention
from sbjax.kernels.pallas_triton_config import BlockSizes
from sbjax.ops import stick_breaking_attention

__all__ = ["BlockSizes", "StickBreakingAttention", "stick_breaking_attention"]
__version__ = "0.1.0"
