"""Which accelerator the default JAX backend runs on."""

from __future__ import annotations

import jax


def on_nvidia_gpu() -> bool:
  """True when JAX's default device is an NVIDIA GPU (where the Pallas Triton kernels run)."""
  return any("nvidia" in d.device_kind.lower() for d in jax.devices()[:1])
