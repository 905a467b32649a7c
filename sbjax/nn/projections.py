"""The multi-head projections every attention module here shares (q, k, v in; o out).

``AttentionProjections`` owns the parameters, their sharding annotations and the argument checks;
subclasses implement ``attend(query, key, value, segment_ids, positions, inputs) -> [B, T, N, H]``
and, for decoding, ``attend_cached(query, key, value, inputs, prompt_lengths)``. Parameter layout
and the KV cache follow ``nnx.MultiHeadAttention`` (``kernel [D, N, H]`` in, ``[N, H, D]`` out;
``init_cache`` makes ``nnx.Cache`` variables), except that the cache index is one per batch row,
so rows of different lengths decode together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes

from sbjax.nn.params import annotated_param
from sbjax.parallel import MODEL

# LeCun normal with the fan-in over the contracted axes: D for [D, N, H], N*H for [N, H, D].
_in_kernel_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
_out_kernel_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")


class AttentionProjections(nnx.Module):
  """Query/key/value projections ``D -> [N|K, H]`` and the output projection ``[N, H] -> D``.

  Heads are annotated on the ``"model"`` mesh axis (kernels ``[D, N, H]`` as ``(None, "model",
  None)``, the output kernel ``[N, H, D]`` as ``("model", None, None)``); the annotations place
  the parameters only when built under a mesh with that axis (``sbjax.nn.params``).
  """

  def __init__(
      self,
      in_features: int,
      num_heads: int,
      *,
      rngs: nnx.Rngs,
      num_kv_heads: int | None = None,
      head_dim: int | None = None,
      out_features: int | None = None,
      use_bias: bool = False,
      dtype=None,
      param_dtype=jnp.float32,
      kernel_init=None,
      bias_init=nnx.initializers.zeros_init(),
  ):
    _check_positive_int("in_features", in_features)
    _check_positive_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
      raise ValueError(
          f"num_heads must be a multiple of num_kv_heads, got {num_heads=}, {num_kv_heads=}.")
    if head_dim is None:
      if in_features % num_heads:
        raise ValueError(
            f"in_features must be divisible by num_heads when head_dim is None, got "
            f"{in_features=}, {num_heads=}.")
      head_dim = in_features // num_heads
    _check_positive_int("head_dim", head_dim)
    out_features = in_features if out_features is None else out_features
    _check_positive_int("out_features", out_features)

    self.in_features, self.out_features = in_features, out_features
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.use_bias = use_bias
    self.dtype, self.param_dtype = dtype, param_dtype

    def param(init, shape, names):
      return annotated_param(init, rngs, shape, param_dtype, names)

    d, n, k, h = in_features, num_heads, num_kv_heads, head_dim
    in_init, out_init = kernel_init or _in_kernel_init, kernel_init or _out_kernel_init
    self.query_kernel = param(in_init, (d, n, h), (None, MODEL, None))
    self.key_kernel = param(in_init, (d, k, h), (None, MODEL, None))
    self.value_kernel = param(in_init, (d, k, h), (None, MODEL, None))
    self.out_kernel = param(out_init, (n, h, out_features), (MODEL, None, None))
    if use_bias:
      self.query_bias = param(bias_init, (n, h), (MODEL, None))
      self.key_bias = param(bias_init, (k, h), (MODEL, None))
      self.value_bias = param(bias_init, (k, h), (MODEL, None))
      self.out_bias = param(bias_init, (out_features,), (None,))
    else:
      self.query_bias = self.key_bias = self.value_bias = self.out_bias = None
    # The KV cache (init_cache): nnx.data marks the None placeholders as state-to-be.
    self.cached_key: nnx.Cache | None = nnx.data(None)  # [B, S, K, H]
    self.cached_value: nnx.Cache | None = nnx.data(None)  # [B, S, K, H]
    self.cache_index: nnx.Cache | None = nnx.data(None)  # [B] int32, the filled length of each row

  def init_cache(self, input_shape, dtype=jnp.float32):
    """An empty KV cache for ``input_shape = (B, S, ...)``: ``B`` rows of up to ``S`` tokens.

    As in ``nnx.MultiHeadAttention.init_cache``; call it before ``module(x, decode=True)``.
    ``dtype`` is the cache's (the compute dtype, e.g. ``jnp.bfloat16``, halves its memory).
    """
    if len(input_shape) < 2 or any(not isinstance(d, int) or d < 1 for d in input_shape[:2]):
      raise ValueError(f"input_shape must start with positive (B, S), got {input_shape=}.")
    b, s = input_shape[:2]
    self.cached_key = nnx.Cache(jnp.zeros((b, s, self.num_kv_heads, self.head_dim), dtype))
    self.cached_value = nnx.Cache(jnp.zeros((b, s, self.num_kv_heads, self.head_dim), dtype))
    self.cache_index = nnx.Cache(jnp.zeros((b,), jnp.int32))

  def write_cache(self, cache: nnx.Cache, new, start):
    """Writes ``new [B, T, ...]`` into ``cache [B, S, ...]`` at each row's ``start [B]``."""
    write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))
    cache[...] = write(cache[...], new.astype(cache.dtype), start)

  def advance_cache(self, t: int, prompt_lengths):
    """Moves the cache index past ``t`` new tokens; returns ``(start [B], cache_len [B], overflow
    [B] bool)``: where the tokens go, each row's filled length after them, and the rows that ran
    past the cache's end.

    A prefill (``prompt_lengths [B]`` given) starts every row afresh at 0 and leaves row ``b`` at
    ``prompt_lengths[b]``, so the next token overwrites its right padding. Overflow raises when
    the index is concrete (eager calls); under ``jit`` it cannot raise without ``checkify``, so
    the caller sets those rows' outputs to NaN.
    """
    if self.cache_index is None:
      raise ValueError("decode=True needs a cache: call init_cache(input_shape) first.")
    b, s = self.cached_key.shape[:2]
    if t > s:  # static: raises at trace time too
      raise ValueError(f"KV cache overflow: {t} new tokens do not fit the cache of S={s} tokens; "
                       "init_cache with a longer input_shape.")
    index = self.cache_index[...]
    if prompt_lengths is None:
      start = index
      cache_len = index + t
    else:
      if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
          raise ValueError(f"prompt_lengths must be [B]=({b},) integers in [1, T={t}], got "
                           f"prompt_lengths={lengths.tolist()}.")
      start = jnp.zeros((b,), jnp.int32)
      cache_len = jnp.asarray(prompt_lengths, jnp.int32)
    overflow = start + t > s
    if not isinstance(overflow, jax.core.Tracer) and np.any(overflow):
      raise ValueError(
          f"KV cache overflow: {t} new token(s) at cache_index={np.asarray(start).tolist()} do not "
          f"fit the cache of S={s} tokens; init_cache with a longer input_shape.")
    self.cache_index[...] = cache_len
    return start, cache_len, overflow

  def attend(self, query, key, value, segment_ids, positions, inputs):
    """``query [B, T, N, H]``, ``key``/``value [B, T, K, H]`` -> ``[B, T, N, H]``; ``inputs`` is
    ``x [B, T, D]`` in the compute dtype, for what a subclass computes from it (a gate)."""
    raise NotImplementedError

  def attend_cached(self, query, key, value, inputs, prompt_lengths):
    """Decoding: appends ``key``/``value [B, T, K, H]`` to the cache and attends ``query [B, T, N,
    H]`` over it -> ``[B, T, N, H]``; with ``prompt_lengths``, the prefill of a fresh cache."""
    raise NotImplementedError

  def __call__(self, x, segment_ids=None, positions=None, *, decode: bool = False,
               prompt_lengths=None):
    """``x [B, T, in_features]`` -> ``[B, T, out_features]``.

    Args:
      x: the inputs.
      segment_ids: optional ``[B, T]`` integers; tokens attend only within their segment.
      positions: optional ``[B, T]`` integer positions (used by position embeddings only).
      decode: use the KV cache (``init_cache`` first): the ``T`` tokens of ``x`` are appended at
        each row's cache index and attend to everything cached before them (and causally among
        themselves); positions come from the cache index.
      prompt_lengths: with ``decode``, marks this call as the prefill of prompts: the cache
        restarts at 0, ``x`` holds right-padded prompts and ``prompt_lengths [B]`` their lengths;
        the whole prompt goes through the training op in one call, and each row's index is left
        at its length (the next token overwrites the padding; outputs at padding are unused).
    """
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, in_features={self.in_features}], got {x.shape=}.")
    if decode and (segment_ids is not None or positions is not None):
      raise ValueError("decode=True takes positions from the cache index and no segment_ids, got "
                       f"segment_ids={segment_ids is not None}, positions={positions is not None}.")
    if prompt_lengths is not None and not decode:
      raise ValueError("prompt_lengths marks a prefill and needs decode=True.")
    if decode and self.cache_index is not None and self.cached_key.shape[0] != x.shape[0]:
      raise ValueError(f"x has batch {x.shape[0]} but the cache was made for "
                       f"B={self.cached_key.shape[0]} rows (init_cache).")
    if segment_ids is not None and segment_ids.shape != x.shape[:2]:
      raise ValueError(f"segment_ids must have shape [B, T]={x.shape[:2]}, got {segment_ids.shape=}.")
    kernels = (self.query_kernel, self.key_kernel, self.value_kernel, self.out_kernel)
    x, wq, wk, wv, wo = dtypes.promote_dtype((x, *(w[...] for w in kernels)), dtype=self.dtype)
    query = jnp.einsum("BTD,DNH->BTNH", x, wq)
    key = jnp.einsum("BTD,DKH->BTKH", x, wk)
    value = jnp.einsum("BTD,DKH->BTKH", x, wv)
    if self.use_bias:
      query = query + self.query_bias[...].astype(x.dtype)
      key = key + self.key_bias[...].astype(x.dtype)
      value = value + self.value_bias[...].astype(x.dtype)
    if decode:
      out = self.attend_cached(query, key, value, x, prompt_lengths).astype(x.dtype)
    else:
      out = self.attend(query, key, value, segment_ids, positions, x).astype(x.dtype)
    y = jnp.einsum("BTNH,NHD->BTD", out, wo)
    if self.use_bias:
      y = y + self.out_bias[...].astype(x.dtype)
    return y


def rms_norm_heads(x, scale, eps: float):
  """RMSNorm of each head over its last axis: ``x [B, T, N, H]``, ``scale [N, H]``; fp32 math."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale.astype(jnp.float32)).astype(x.dtype)
