"""sbjax: stick-breaking attention for JAX and Flax."""

from sbjax.nn.stick_breaking import StickBreakingAttention
from sbjax.ops import stick_breaking_attention

__all__ = ["StickBreakingAttention", "stick_breaking_attention"]
__version__ = "0.1.0"
