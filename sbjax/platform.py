"""Which accelerator the default JAX backend runs on."""

from __future__ import annotations

import jax


def on_nvidia_gpu() -> bool:
  """True when JAX's default device is an NVIDIA GPU (where the Pallas Triton kernels run)."""
  return any("nvidia" in d.device_kind.lower() for d in jax.devices()[:1])


def on_hopper() -> bool:
  """True when JAX's default device is an NVIDIA Hopper GPU (compute capability 9.x), where the
  Pallas Mosaic GPU kernels run."""
  device = jax.devices()[0]
  return on_nvidia_gpu() and str(getattr(device, "compute_capability", "")).startswith("9")
