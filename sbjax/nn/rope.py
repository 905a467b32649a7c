"""Rotary position embedding (RoPE, Su et al. 2021), half-split ("NeoX") layout."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, *, base: float = 10000.0):
  """Rotates each pair ``(x[..., i], x[..., i + H/2])`` by ``positions * base**(-2i/H)``.

  Args:
    x: ``[B, T, N, H]`` with even ``H``.
    positions: ``[B, T]`` or ``[T]`` integer (or float) positions.
    base: the wavelength base.

  Returns:
    ``[B, T, N, H]`` in ``x.dtype``; the angles and the rotation are computed in float32, so
    ``rope(q, i) . rope(k, j)`` depends on ``i - j`` only.
  """
  h = x.shape[-1]
  if h % 2:
    raise ValueError(f"RoPE needs an even head dim, got {x.shape=}.")
  positions = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)  # [B, T]
  inv_freq = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  angles = positions[:, :, None, None] * inv_freq  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, H/2] each
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
