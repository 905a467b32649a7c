"""The public op: argument checks, implementation choice and dispatch."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from sbjax import reference, scan
from sbjax.kernels import pallas_triton

Implementation = Literal["pallas", "scan", "xla"]
IMPLEMENTATIONS = ("pallas", "scan", "xla")


def _check_array(name, x):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}.")
  if x.ndim != 4:
    raise ValueError(f"{name} must have rank 4 [B, T, heads, head_dim], got {name}.shape={x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}.")


def check_inputs(query, key, value, scale, segment_ids, implementation, block_sizes):
  """Raises ``ValueError``/``TypeError`` naming the bad argument, before any computation."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    _check_array(name, x)
  if not (query.dtype == key.dtype == value.dtype):
    raise TypeError(
        "query, key and value must share a dtype, got "
        f"query.dtype={query.dtype}, key.dtype={key.dtype}, value.dtype={value.dtype}.")
  b, t, n, h = query.shape
  if key.shape[:2] != (b, t) or value.shape[:2] != (b, t):
    raise ValueError(
        "query, key and value must share batch and length [B, T], got "
        f"{query.shape=}, {key.shape=}, {value.shape=}.")
  if key.shape[3] != h:
    raise ValueError(f"key head_dim must equal query's, got {query.shape=}, {key.shape=}.")
  if value.shape[2] != key.shape[2]:
    raise ValueError(f"value must have as many heads as key, got {key.shape=}, {value.shape=}.")
  if n % key.shape[2]:
    raise ValueError(
        f"query heads must be a multiple of key/value heads, got N={n} query heads and "
        f"K={key.shape[2]} key/value heads.")
  if segment_ids is not None:
    if not hasattr(segment_ids, "shape") or segment_ids.shape != (b, t):
      raise ValueError(
          f"segment_ids must have shape [B, T]=({b}, {t}), got "
          f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}.")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise TypeError(f"segment_ids must have an integer dtype, got segment_ids.dtype={segment_ids.dtype}.")
  if scale is not None and not isinstance(scale, (int, float)):
    if not hasattr(scale, "shape") or np.shape(scale) != ():
      raise ValueError(f"scale must be a Python float or a scalar array, got {scale!r}.")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if block_sizes is not None and implementation not in (None, "pallas"):
    raise ValueError(f"block_sizes applies to implementation='pallas' only, got {implementation=}.")


def default_implementation() -> str:
  """The Pallas kernels on an NVIDIA GPU, the scan path elsewhere."""
  return "pallas" if jax.default_backend() == "gpu" else "scan"


def stick_breaking_attention(
    query,
    key,
    value,
    *,
    scale=None,
    attend_current: bool = False,
    segment_ids=None,
    return_remainder: bool = False,
    implementation: Implementation | None = None,
    interpret: bool = False,
    block_sizes=None,
):
  """Stick-breaking attention (Tan et al., ICLR 2025), causal, layout BTNH.

  Query ``j`` breaks a stick over its earlier keys, nearest first: key ``i`` takes the share
  ``beta_ji = sigmoid(scale * q_j . k_i)`` of what the nearer keys left, so no position embedding
  is needed. See DESIGN.md §1 for the maths.

  Args:
    query: ``[B, T, N, H]`` floating array.
    key: ``[B, T, K, H]``, same dtype, ``N % K == 0`` (query head ``n`` reads kv head
      ``n // (N // K)``: GQA/MQA without repeating K/V).
    value: ``[B, T, K, Hv]``, same dtype.
    scale: multiplies ``q . k``; a Python float or a (possibly traced, differentiable) scalar.
      Defaults to ``1 / sqrt(H)``.
    attend_current: if True, query ``j`` also sees key ``j`` (``i <= j`` instead of ``i < j``).
    segment_ids: optional ``[B, T]`` integers; keys of another segment are invisible and leave
      the stick unchanged.
    return_remainder: also return ``rem``.
    implementation: ``None`` (auto: ``"pallas"`` on an NVIDIA GPU, else ``"scan"``),
      ``"pallas"`` (Pallas Triton kernels), ``"scan"`` (pure JAX, query blocks and an
      associative scan) or ``"xla"`` (the dense reference, O(T^2) memory).
    interpret: run the Pallas kernels in interpret mode (any backend; slow).
    block_sizes: a ``sbjax.BlockSizes`` for the Pallas kernels; defaults by head dim and dtype.

  Returns:
    ``out [B, T, N, Hv]`` in ``query.dtype``; with ``return_remainder``, ``(out, rem)`` where
    ``rem [B, T, N] = 1 - sum_i A_ji`` is float32 (float64 for float64 inputs).
  """
  check_inputs(query, key, value, scale, segment_ids, implementation, block_sizes)
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[-1])
  scale = jnp.asarray(scale, jnp.float32 if query.dtype != jnp.float64 else jnp.float64)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  implementation = implementation or default_implementation()
  if implementation == "xla":
    out, rem = reference.stick_breaking_attention(
        query, key, value, scale, segment_ids, attend_current=attend_current)
  elif implementation == "scan":
    out, rem = scan.stick_breaking_attention(
        query, key, value, scale, segment_ids, attend_current=attend_current)
  else:
    out, rem = pallas_triton.stick_breaking_attention(
        query, key, value, scale, segment_ids, attend_current=attend_current,
        block_sizes=block_sizes, interpret=interpret)
  return (out, rem) if return_remainder else out
