"""sbjax: stick-breaking attention for JAX and Flax.

``sbjax.stick_breaking_attention`` and ``sbjax.BlockSizes`` need only JAX; the Flax module
``sbjax.StickBreakingAttention`` is imported on first use, so ``import sbjax.reference`` (or the op
alone) does not pull in Flax.
"""

from sbjax.kernels.pallas_mosaic_gpu_config import MosaicBlockSizes
from sbjax.kernels.pallas_triton_config import BlockSizes
from sbjax.kernels.pallas_triton_decode import DecodeBlockSizes
from sbjax.ops import (default_implementation, stick_breaking_attention, stick_breaking_decode,
                       stick_breaking_weights)

__all__ = ["BlockSizes", "DecodeBlockSizes", "MosaicBlockSizes", "StickBreakingAttention",
           "default_implementation",
           "stick_breaking_attention", "stick_breaking_decode", "stick_breaking_weights"]
__version__ = "0.1.0"


def __getattr__(name):  # PEP 562: the Flax module on first access
  if name == "StickBreakingAttention":
    from sbjax.nn.stick_breaking import StickBreakingAttention  # pylint: disable=g-import-not-at-top
    return StickBreakingAttention
  raise AttributeError(f"module 'sbjax' has no attribute {name!r}")


def __dir__():
  return sorted(__all__ + ["__version__"])
