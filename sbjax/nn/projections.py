"""The multi-head projections every attention module here shares (q, k, v in; o out).

``AttentionProjections`` owns the parameters, their sharding annotations and the argument checks;
subclasses implement ``attend(query, key, value, segment_ids, positions, inputs) -> [B, T, N, H]``.
Parameter layout follows ``nnx.MultiHeadAttention`` (``kernel [D, N, H]`` in, ``[N, H, D]`` out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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

  def attend(self, query, key, value, segment_ids, positions, inputs):
    """``query [B, T, N, H]``, ``key``/``value [B, T, K, H]`` -> ``[B, T, N, H]``; ``inputs`` is
    ``x [B, T, D]`` in the compute dtype, for what a subclass computes from it (a gate)."""
    raise NotImplementedError

  def __call__(self, x, segment_ids=None, positions=None):
    """``x [B, T, in_features]`` -> ``[B, T, out_features]``.

    Args:
      x: the inputs.
      segment_ids: optional ``[B, T]`` integers; tokens attend only within their segment.
      positions: optional ``[B, T]`` integer positions (used by position embeddings only).
    """
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must have shape [B, T, in_features={self.in_features}], got {x.shape=}.")
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
