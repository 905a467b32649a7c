"""sbjax: stick-breaking attention for JAX and Flax."""

from sbjax.ops import stick_breaking_attention

__all__ = ["stick_breaking_attention"]
__version__ = "0.1.0"
