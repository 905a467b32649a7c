"""The public op: argument checks, implementation choice and dispatch."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from sbjax import decode, reference, scan
from sbjax.common import compute_dtype
from sbjax.kernels import pallas_mosaic_gpu, pallas_triton, pallas_triton_decode
from sbjax.kernels.pallas_mosaic_gpu_config import MosaicBlockSizes
from sbjax.kernels.pallas_triton_config import BlockSizes
from sbjax.platform import on_hopper, on_nvidia_gpu

Implementation = Literal["pallas", "pallas_triton", "pallas_mosaic_gpu", "scan", "xla"]
IMPLEMENTATIONS = typing.get_args(Implementation)


def _check_array(name, x):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(x).__name__}.")
  if x.ndim != 4:
    raise ValueError(f"{name} must have rank 4 [B, T, N|K, H], got {name}.shape={x.shape}.")
  if 0 in x.shape:
    raise ValueError(f"{name} must have no empty axis, got {name}.shape={x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={x.dtype}.")


def _check_arrays_of_one_dtype(**arrays):
  """Each is a rank-4 floating array with no empty axis, and all share one dtype."""
  for name, x in arrays.items():
    _check_array(name, x)
  if len({x.dtype for x in arrays.values()}) > 1:
    names = list(arrays)
    raise TypeError(
        f"{', '.join(names[:-1])} and {names[-1]} must share a dtype, got "
        + ", ".join(f"{name}.dtype={x.dtype}" for name, x in arrays.items()) + ".")


def check_inputs(query, key, value, scale, segment_ids, implementation, interpret, block_sizes,
                 forget_gate=None, skip_tolerance=0.0):
  """Raises ``ValueError``/``TypeError`` naming the bad argument, before any computation."""
  if (isinstance(skip_tolerance, bool) or not isinstance(skip_tolerance, (int, float))
      or not 0.0 <= skip_tolerance < 1.0):
    raise ValueError(f"skip_tolerance must be a float in [0, 1), got {skip_tolerance!r}.")
  _check_arrays_of_one_dtype(query=query, key=key, value=value)
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
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
      raise TypeError(f"segment_ids must be an array, got {type(segment_ids).__name__}.")
    if segment_ids.shape != (b, t):
      raise ValueError(
          f"segment_ids must have shape [B, T]=({b}, {t}), got {segment_ids.shape}.")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise TypeError(
          f"segment_ids must have an integer dtype, got segment_ids.dtype={segment_ids.dtype}.")
  if forget_gate is not None:
    if not hasattr(forget_gate, "shape") or not hasattr(forget_gate, "dtype"):
      raise TypeError(f"forget_gate must be an array, got {type(forget_gate).__name__}.")
    if forget_gate.shape != (b, t, key.shape[2]):
      raise ValueError(
          f"forget_gate must have shape [B, T, K]=({b}, {t}, {key.shape[2]}), "
          f"got forget_gate.shape={forget_gate.shape}.")
    if not jnp.issubdtype(forget_gate.dtype, jnp.floating):
      raise TypeError(
          f"forget_gate must have a floating dtype, got forget_gate.dtype={forget_gate.dtype}.")
  if scale is not None:
    is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    is_array = hasattr(scale, "shape") and hasattr(scale, "dtype")
    if not (is_number or is_array) or (is_array and not jnp.issubdtype(scale.dtype, jnp.number)):
      raise TypeError(f"scale must be a Python float or a scalar array, got {scale!r}.")
    if is_array and np.shape(scale) != ():
      raise ValueError(f"scale must be a scalar, got scale.shape={np.shape(scale)}.")
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if implementation == "pallas_mosaic_gpu":
    _check_mosaic_gpu(query, value, interpret, block_sizes)
    return
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError(f"block_sizes must be a sbjax.BlockSizes, got {type(block_sizes).__name__}.")
  for name, given in (("block_sizes", block_sizes is not None), ("interpret", interpret)):
    if given and implementation not in (None, "pallas", "pallas_triton"):
      raise ValueError(f"{name} applies to the Pallas kernels only, got {implementation=}.")
  if implementation in ("pallas", "pallas_triton"):
    reason = pallas_triton.unsupported(query, value)
    if reason:
      raise ValueError(f"implementation={implementation!r} {reason}; use implementation='scan' "
                       "or 'xla'.")
    if not interpret and not _lowering_for_nvidia_gpu():
      device = jax.devices()[0]
      raise ValueError(
          f"implementation={implementation!r} needs an NVIDIA GPU or interpret=True, got "
          f"interpret=False with JAX's default device {device.device_kind!r} (platform "
          f"{device.platform!r}); use implementation='scan' (runs anywhere) or interpret=True "
          "(slow; for tests).")


def _check_mosaic_gpu(query, value, interpret, block_sizes):
  """``check_inputs`` for ``implementation="pallas_mosaic_gpu"`` (Hopper)."""
  if block_sizes is not None and not isinstance(block_sizes, MosaicBlockSizes):
    raise TypeError("implementation='pallas_mosaic_gpu' takes a MosaicBlockSizes, got "
                    f"{type(block_sizes).__name__}.")
  reason = pallas_mosaic_gpu.unsupported(query, value)
  if reason:
    raise ValueError(f"implementation='pallas_mosaic_gpu' {reason}; use implementation='pallas'.")
  if not interpret and not _lowering_for_nvidia_gpu():
    raise ValueError(
        "implementation='pallas_mosaic_gpu' needs an NVIDIA Hopper GPU or interpret=True, got "
        f"interpret=False on {jax.devices()[0].device_kind!r}.")


def _lowering_for_nvidia_gpu() -> bool:
  """True on an NVIDIA GPU, or under an abstract mesh of NVIDIA devices (lowering for a GPU from
  another machine, e.g. ``jit(...).trace(...).lower(lowering_platforms=("cuda",))``)."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return on_nvidia_gpu() or (device is not None and "nvidia" in device.device_kind.lower())


def default_implementation(query=None, value=None) -> str:
  """The Pallas kernels on an NVIDIA GPU for inputs they support, the scan path otherwise."""
  if on_nvidia_gpu() and (query is None or not pallas_triton.unsupported(query, value)):
    return "pallas"
  return "scan"


def stick_breaking_attention(
    query,
    key,
    value,
    *,
    scale=None,
    attend_current: bool = False,
    segment_ids=None,
    forget_gate=None,
    return_remainder: bool = False,
    implementation: Implementation | None = None,
    interpret: bool = False,
    block_sizes=None,
    skip_tolerance: float = 0.0,
):
  """Stick-breaking attention (Tan et al., ICLR 2025), causal, layout BTNH.

  Query ``j`` breaks a stick over its earlier keys, nearest first: key ``i`` takes the share
  ``beta_ji = sigmoid(scale * q_j . k_i)`` of what the nearer keys left, so no position embedding
  is needed. See docs/design.md §1 for the maths.

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
    forget_gate: optional ``[B, T, K]`` floating logits ``g``, one per key position and kv head
      (the slides' forget gate, computed on the key/value side): key ``i`` takes
      ``beta_ji = sigmoid(g_i) * sigmoid(z_ji)``. ``g = +inf`` is the ungated op; ``g = -inf`` makes
      the key take nothing and leave the stick unchanged. Differentiable; math in float32
      (float64 for float64 inputs).
    return_remainder: also return ``rem``.
    implementation: ``None`` (auto: ``"pallas"`` on an NVIDIA GPU for inputs it supports, else
      ``"scan"``), ``"pallas"`` (the fastest Pallas kernels for this GPU and these inputs: on a
      Hopper GPU, for inputs the Mosaic GPU forward takes and no ``block_sizes``, that forward
      when not differentiated and the Triton kernels under differentiation, whose backward is
      the faster one so far; else the Triton ones), ``"pallas_triton"`` (the Pallas Triton
      kernels, forced), ``"pallas_mosaic_gpu"`` (the Mosaic GPU kernels for Hopper, forward and
      backward: bf16/fp16, head dims 64/128, segment_ids, forget_gate, skipping and
      skip_tolerance),
      ``"scan"`` (pure JAX, query blocks and an associative scan) or ``"xla"`` (the dense
      reference, O(T^2) memory).
    interpret: run the Pallas kernels in interpret mode (any backend; slow).
    block_sizes: a ``sbjax.BlockSizes`` for the Pallas Triton kernels, a
      ``sbjax.MosaicBlockSizes`` for ``"pallas_mosaic_gpu"``; defaults by head dim and dtype
      (``get_default``).
    skip_tolerance: what the Pallas kernels may leave out. 0 (default): a row block stops walking
      its keys once every row's stick is below 2^-152, where every farther weight and gradient is
      exactly 0 in float32: the result is that of walking every key. ``> 0``: it stops once every
      row's stick is below ``skip_tolerance``; the farther keys would change ``out`` by at most
      ``rem * max|v| < skip_tolerance * max|v|`` per element, and the returned ``rem`` (the stick
      where the walk stopped) is an upper bound of the exact one. Gradients are those of the
      truncated sum (docs/design.md §1, "Tolerance-bounded skipping"). The scan and xla paths
      compute every key whatever the value.

  Returns:
    ``out [B, T, N, Hv]`` in ``query.dtype``; with ``return_remainder``, ``(out, rem)`` where
    ``rem [B, T, N] = 1 - sum_i A_ji`` is float32 (float64 for float64 inputs).
  """
  check_inputs(query, key, value, scale, segment_ids, implementation, interpret, block_sizes,
               forget_gate, skip_tolerance)
  out, rem = dispatch(query, key, value, scale, segment_ids, forget_gate,
                      attend_current=attend_current, implementation=implementation,
                      interpret=interpret, block_sizes=block_sizes, skip_tolerance=skip_tolerance)
  return (out, rem) if return_remainder else out


def dispatch(query, key, value, scale, segment_ids, forget_gate, *, attend_current,
             implementation, interpret, block_sizes, skip_tolerance, **cross):
  """``(out, rem)`` of checked arguments (``check_inputs``): the default scale, the dtypes the
  paths take, the implementation chosen and called. ``cross`` (``causal=False,
  key_segment_ids=...``: ``sbjax.context_parallel.chunk_attention``) goes to the paths that
  have a cross-chunk mode."""
  dtype = compute_dtype(query.dtype)
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[-1])
  scale = jnp.asarray(scale, dtype)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  if forget_gate is not None:
    forget_gate = forget_gate.astype(dtype)
  implementation = implementation or default_implementation(query, value)
  if implementation == "xla":
    return reference.stick_breaking_attention(
        query, key, value, scale, segment_ids, forget_gate, attend_current=attend_current, **cross)
  if implementation == "scan":
    return scan.stick_breaking_attention(
        query, key, value, scale, segment_ids, forget_gate, attend_current=attend_current, **cross)
  if implementation == "pallas_mosaic_gpu":
    return pallas_mosaic_gpu.stick_breaking_attention(
        query, key, value, scale, segment_ids, forget_gate, attend_current=attend_current,
        block_sizes=block_sizes, skip_tolerance=skip_tolerance, interpret=interpret, **cross)
  if (implementation == "pallas" and block_sizes is None and on_hopper()
      and pallas_mosaic_gpu.unsupported(query, value) is None):
    return _mosaic_forward_triton_gradients(
        query, key, value, scale, forget_gate, segment_ids, cross.get("key_segment_ids"),
        (attend_current, skip_tolerance, interpret, cross.get("causal", True)))
  return pallas_triton.stick_breaking_attention(
      query, key, value, scale, segment_ids, forget_gate, attend_current=attend_current,
      block_sizes=block_sizes, skip_tolerance=skip_tolerance, interpret=interpret, **cross)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _mosaic_forward_triton_gradients(q, k, v, scale, gate, segment_ids, key_segment_ids, static):
  """``implementation="pallas"`` on Hopper: ``(out, rem)`` of the Mosaic GPU forward, the faster
  one (experiments/results/benchmark_mosaic_h100.json), when not differentiated; under
  differentiation the Triton forward and its backward, so that the gradients belong to the
  forward they were computed with (the Mosaic backward is still slower than Triton's:
  experiments/results/benchmark_mosaic_bwd_h100.json). Causal or cross-chunk (``static[3]``)."""
  attend_current, skip_tolerance, interpret, causal = static
  return pallas_mosaic_gpu.stick_breaking_attention(
      q, k, v, scale, segment_ids, gate, attend_current=attend_current,
      skip_tolerance=skip_tolerance, interpret=interpret,
      **_cross_kwargs(causal, key_segment_ids))


def _cross_kwargs(causal: bool, key_segment_ids) -> dict:
  return {} if causal else dict(causal=False, key_segment_ids=key_segment_ids)


def _triton_vjp(q, k, v, scale, gate, segment_ids, key_segment_ids, static):
  attend_current, skip_tolerance, interpret, causal = static
  triton = lambda q, k, v, scale, gate: pallas_triton.stick_breaking_attention(
      q, k, v, scale, segment_ids, gate, attend_current=attend_current,
      skip_tolerance=skip_tolerance, interpret=interpret, **_cross_kwargs(causal, key_segment_ids))
  out, vjp = jax.vjp(triton, q, k, v, scale, gate)
  return out, vjp  # the vjp function is a pytree of the Triton residuals


_mosaic_forward_triton_gradients.defvjp(
    _triton_vjp, lambda static, vjp, cotangents: (*vjp(cotangents), None, None))


def stick_breaking_weights(query, key, *, scale=None, attend_current: bool = False,
                           segment_ids=None, forget_gate=None):
  """The attention weights ``A [B, N, T, T]`` of :func:`stick_breaking_attention` (same arguments):
  ``A[b, n, j, i]`` is what query ``j`` of head ``n`` takes from key ``i``'s value, ``1 - rem``
  in all. Dense (O(T^2) memory), float32 or wider: for inspecting attention maps."""
  check_inputs(query, key, key, scale, segment_ids, None, False, None, forget_gate)
  dtype = compute_dtype(query.dtype)
  scale = jnp.asarray(1.0 / math.sqrt(query.shape[-1]) if scale is None else scale, dtype)
  return reference.attention_weights(
      query, key, scale, None if segment_ids is None else segment_ids.astype(jnp.int32),
      None if forget_gate is None else forget_gate.astype(dtype), attend_current=attend_current)


DecodeImplementation = Literal["pallas", "xla"]
DECODE_IMPLEMENTATIONS = typing.get_args(DecodeImplementation)


def check_decode_inputs(query, key_cache, value_cache, cache_len, scale, forget_gate_cache,
                        implementation, chunk_size, skip_tolerance, interpret=False,
                        block_sizes=None, return_keys_read=False):
  """Raises ``ValueError``/``TypeError`` naming the bad argument, before any computation."""
  _check_arrays_of_one_dtype(query=query, key_cache=key_cache, value_cache=value_cache)
  b, q_len, n, h = query.shape
  _, s, k, _ = key_cache.shape
  if key_cache.shape[0] != b or value_cache.shape[:3] != key_cache.shape[:3]:
    raise ValueError(
        "key_cache [B, S, K, H] and value_cache [B, S, K, Hv] must share B, S, K with query's B, "
        f"got {query.shape=}, {key_cache.shape=}, {value_cache.shape=}.")
  if key_cache.shape[3] != h:
    raise ValueError(f"key_cache head_dim must equal query's, got {query.shape=}, {key_cache.shape=}.")
  if n % k:
    raise ValueError(f"query heads must be a multiple of cache heads, got N={n} and K={k}.")
  if q_len > s:
    raise ValueError(f"query must have at most S={s} tokens (the cache length), got Q={q_len}.")
  if not hasattr(cache_len, "shape") or not hasattr(cache_len, "dtype"):
    raise TypeError(f"cache_len must be an integer array [B], got {type(cache_len).__name__}.")
  if cache_len.shape != (b,) or not jnp.issubdtype(cache_len.dtype, jnp.integer):
    raise ValueError(
        f"cache_len must be integers of shape [B]=({b},), got {cache_len.shape=}, "
        f"{cache_len.dtype=}.")
  if not isinstance(cache_len, jax.core.Tracer):
    lengths = np.asarray(cache_len)
    if lengths.min() < q_len or lengths.max() > s:
      raise ValueError(
          f"cache_len must lie in [Q, S]=[{q_len}, {s}] (the new queries' keys are in the cache), "
          f"got cache_len={lengths.tolist()}.")
  if forget_gate_cache is not None:
    if not hasattr(forget_gate_cache, "shape") or not hasattr(forget_gate_cache, "dtype"):
      raise TypeError(
          f"forget_gate_cache must be an array, got {type(forget_gate_cache).__name__}.")
    if forget_gate_cache.shape != (b, s, k) or not jnp.issubdtype(forget_gate_cache.dtype,
                                                                  jnp.floating):
      raise ValueError(
          f"forget_gate_cache must be floating with shape [B, S, K]=({b}, {s}, {k}), got "
          f"{forget_gate_cache.shape=}, {forget_gate_cache.dtype=}.")
  if scale is not None:
    is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not is_number and not (hasattr(scale, "shape") and np.shape(scale) == ()):
      raise TypeError(f"scale must be a Python float or a scalar array, got {scale!r}.")
  if implementation is not None and implementation not in DECODE_IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be None or one of {DECODE_IMPLEMENTATIONS}, got {implementation!r}.")
  if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size=}.")
  if skip_tolerance is not None and not (isinstance(skip_tolerance, (int, float))
                                         and 0 <= skip_tolerance < 1):
    raise ValueError(f"skip_tolerance must be None or a float in [0, 1), got {skip_tolerance=}.")
  if block_sizes is not None and not isinstance(block_sizes, pallas_triton_decode.DecodeBlockSizes):
    raise TypeError(
        f"block_sizes must be a sbjax.DecodeBlockSizes, got {type(block_sizes).__name__}.")
  for name, given in (("block_sizes", block_sizes is not None), ("interpret", interpret)):
    if given and implementation != "pallas":
      raise ValueError(f"{name} applies to implementation='pallas' only, got {implementation=}.")
  if implementation == "pallas":
    if chunk_size is not None:
      raise ValueError(
          "chunk_size applies to implementation='xla' only (the kernel takes its chunk from "
          "block_sizes), got chunk_size with implementation='pallas'.")
    reason = pallas_triton.unsupported(query, value_cache)
    if reason:
      raise ValueError(f"implementation='pallas' {reason}; use implementation='xla'.")
    if not interpret and not _lowering_for_nvidia_gpu():
      raise ValueError(
          "implementation='pallas' needs an NVIDIA GPU or interpret=True, got interpret=False "
          f"on {jax.devices()[0].device_kind!r}; use implementation='xla' (runs anywhere).")


def stick_breaking_decode(
    query,
    key_cache,
    value_cache,
    cache_len,
    *,
    scale=None,
    forget_gate_cache=None,
    attend_current: bool = False,
    return_remainder: bool = False,
    return_keys_read: bool = False,
    implementation: DecodeImplementation | None = None,
    chunk_size: int | None = None,
    skip_tolerance: float | None = 0.0,
    interpret: bool = False,
    block_sizes: pallas_triton_decode.DecodeBlockSizes | None = None,
):
  """Stick-breaking attention of ``Q`` new tokens over a KV cache (decoding), layout BTNH.

  The new tokens' keys and values are in the cache already: query ``j`` sits at position
  ``cache_len[b] - Q + j`` and sees the cache keys before it (and its own with
  ``attend_current``), exactly as :func:`stick_breaking_attention` over the prefix would; keys at
  and past ``cache_len[b]`` are invisible. The cache is read in chunks, nearest first, each with
  a fresh stick, combined by ``o = o_near + rem_near * o_far`` (docs/design.md §1); a row stops
  reading once its stick is used up.

  ``implementation="pallas"`` is a split-K kernel: one program per (row, kv head, chunk) walks
  its chunk nearest first with a fresh stick (skipping exactly within the chunk) and the chunks
  are combined in JAX; ``"xla"`` (portable, the oracle) visits the chunks one after another,
  nearest first, and stops reading the cache once every query's stick is used up.

  Args:
    query: ``[B, Q, N, H]``, ``Q`` new tokens (1 for one decoding step).
    key_cache: ``[B, S, K, H]``, same dtype, ``N % K == 0``.
    value_cache: ``[B, S, K, Hv]``, same dtype.
    cache_len: ``[B]`` integers in ``[Q, S]``, the filled length of each row (checked when
      concrete; under ``jit`` a row with ``cache_len < Q`` gives its earliest queries nothing).
    scale: multiplies ``q . k``; defaults to ``1 / sqrt(H)``.
    forget_gate_cache: optional ``[B, S, K]`` forget-gate logits of the cached keys.
    attend_current: as in :func:`stick_breaking_attention`.
    return_remainder: also return ``rem [B, Q, N]`` (float32; float64 for float64 inputs).
    return_keys_read: also return ``keys_read [B]`` int32, the cache keys each row read (the
      Pallas kernel: the mean over kv heads, rounded up).
    implementation: ``None`` (``"pallas"`` on an NVIDIA GPU for inputs it supports, else
      ``"xla"``), ``"pallas"`` (the Pallas Triton kernel) or ``"xla"`` (the portable chunked
      path, ``sbjax/decode.py``).
    chunk_size: keys per chunk of the ``"xla"`` path; default 256 (``min(chunk_size, S)``).
    skip_tolerance: ``0.0`` (default): a row stops once its stick is below ``2^-152``
      (``2^-1080`` for float64), where it is exactly 0 in the compute dtype, so skipping changes
      no bit of the result. ``> 0``: stop once ``rem < skip_tolerance``; the output then differs
      from the full result by at most ``skip_tolerance * max|v|`` (the unread values). ``None``:
      read every chunk. ``"pallas"`` skips within each chunk exactly, and leaves out the chunks
      past each row's ``block_sizes.num_near_chunks`` nearest once their stick is below the
      threshold (``sbjax/kernels/pallas_triton_decode.py``).
    interpret: run the Pallas kernel in interpret mode (any backend; slow).
    block_sizes: a ``sbjax.DecodeBlockSizes`` (chunk and tile sizes) for the Pallas kernel.

  Returns:
    ``out [B, Q, N, Hv]`` in ``query.dtype``, followed by ``rem`` and ``keys_read`` if asked for.
    Not differentiable in reverse mode (a ``lax.while_loop``); train with
    :func:`stick_breaking_attention`.
  """
  check_decode_inputs(query, key_cache, value_cache, cache_len, scale, forget_gate_cache,
                      implementation, chunk_size, skip_tolerance, interpret, block_sizes,
                      return_keys_read)
  dtype = compute_dtype(query.dtype)
  if scale is None:
    scale = 1.0 / math.sqrt(query.shape[-1])
  if forget_gate_cache is not None:
    forget_gate_cache = forget_gate_cache.astype(dtype)
  if implementation is None:
    implementation = "pallas" if default_implementation(query, value_cache) == "pallas" and (
        chunk_size is None) else "xla"
  if implementation == "pallas":
    if skip_tolerance is None:
      block_sizes = dataclasses.replace(
          block_sizes or pallas_triton_decode.DecodeBlockSizes(), skip_used_stick=False)
    out, rem, keys_read = pallas_triton_decode.decode(
        query, key_cache, value_cache, cache_len, jnp.asarray(scale, dtype), forget_gate_cache,
        attend_current=attend_current, block_sizes=block_sizes,
        skip_tolerance=skip_tolerance or 0.0, return_keys_read=True, interpret=interpret)
    keys_read = -(-jnp.sum(keys_read, axis=1) // key_cache.shape[2])  # [B, K] -> [B], rounded up
  else:
    out, rem, keys_read = decode.stick_breaking_decode(
        query, key_cache, value_cache, cache_len, jnp.asarray(scale, dtype), forget_gate_cache,
        attend_current=attend_current, chunk_size=chunk_size, skip_tolerance=skip_tolerance)
  extra = (rem,) * return_remainder + (keys_read,) * return_keys_read
  return (out, *extra) if extra else out
