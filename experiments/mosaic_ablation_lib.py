"""Where the Mosaic GPU forward's time goes: the kernel timed with parts of its per-logit work cut.

Each variant patches the forward kernel's tile math while it is traced (its outputs are then
wrong: only its time counts), on the op's default tiling with the dense walk
(``skip_used_stick=False``: every variant walks the same keys):

- ``full``: the kernel as it is;
- ``no_softplus``: ``(log2 beta, log2(1 - beta)) = (min(x, 0), min(-x, 0))``: the softplus's two
  MUFU ops (exp2, log2) and its ALU work gone;
- ``no_triangle``: the in-block sums of ``log2(1 - beta)`` are the terms themselves: no bf16
  conversion, no triangle wgmma;
- ``no_weight_exp2``: the weights are their base-2 logs (no exp2): one MUFU op gone;
- ``matmuls_only``: all three cut: ``q k^T``, ``a @ v``, the masks, the stick's row sums and adds.

This is an ablation probe: it reaches into ``sbjax.kernels`` on purpose (the one exception to
experiments using the public API). ``softmax_fa3`` (JAX's Mosaic GPU FlashAttention-3 example,
``attention_mgpu``, causal) and ``cudnn`` run in the same process as references.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import types
from unittest import mock

import jax
import jax.numpy as jnp

from sbjax.kernels import pallas_mosaic_gpu_fwd as fwd
from sbjax.kernels import pallas_mosaic_gpu_tiles as tiles

from benchmark_lib import attention, benchmark_inputs
from sbjax.testing import median_time_ms


def _cheap_stick_terms(x, gate=None):
  del gate
  return jnp.minimum(x, 0.0), jnp.minimum(-x, 0.0)


def _no_triangle(x, tri_smem, **_):
  del tri_smem
  return x


class _NoExp2(types.SimpleNamespace):
  """``jax.numpy`` with ``exp2`` the identity, for the forward module's own calls (the weights,
  and the remainder it stores)."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def exp2(x):
    return x


_PATCHES = {
    "softplus": lambda: mock.patch.object(tiles, "stick_terms", _cheap_stick_terms),
    "triangle": lambda: mock.patch.object(tiles, "in_block_sums", _no_triangle),
    "weight_exp2": lambda: mock.patch.object(fwd, "jnp", _NoExp2()),
}
VARIANTS = {
    "full": (),
    "no_softplus": ("softplus",),
    "no_triangle": ("triangle",),
    "no_weight_exp2": ("weight_exp2",),
    "matmuls_only": ("softplus", "triangle", "weight_exp2"),
}
REFERENCES = ("softmax_fa3", "cudnn")
# An abstract Hopper, for tracing the kernel without a GPU.
_HOPPER = jax.sharding.AbstractMesh(
    (1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
    abstract_device=jax.sharding.AbstractDevice("NVIDIA H200", None, "cuda"))


@contextlib.contextmanager
def ablated(variant: str):
  """The forward kernel traced inside this context lacks what ``VARIANTS[variant]`` names."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}.")
  with contextlib.ExitStack() as stack:
    for cut in VARIANTS[variant]:
      stack.enter_context(_PATCHES[cut]())
    yield


def reference(name: str, head_dim: int, dtype):
  """``(f(q, k, v, scale) -> out, input dtype or None)`` of a softmax reference (GPU only);
  JAX's FlashAttention-3 example takes fp16 only."""
  if name == "cudnn":
    return attention("cudnn", head_dim, dtype), None
  if name == "softmax_fa3":
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=g-import-not-at-top
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                         causal=True)
    return lambda q, k, v, s: attention_mgpu.attention(q, k, v, config), jnp.float16
  raise ValueError(f"reference must be one of {REFERENCES}, got {name!r}.")


def operation_counts(variant: str, args) -> collections.Counter:
  """How often the ablated forward's jaxpr (the kernel body included) calls each primitive
  (``exp2``, ``log2``, ``wgmma_ref``, ...) on ``args`` (``(q, k, v, scale)``, shapes suffice),
  traced for an abstract Hopper on any machine."""
  fn = attention("mosaic_dense", args[0].shape[-1], args[0].dtype)
  with ablated(variant), jax.sharding.use_abstract_mesh(_HOPPER):
    text = str(jax.make_jaxpr(fn)(*args))
  return collections.Counter(re.findall(r"^\s*(?:\S+ = )?(\w+) ", text, flags=re.M))


def run(b, t, n, h, *, variants, references, iters, dtype=jnp.bfloat16):
  """Yields records ``{name, dtype, ms, tflops}``: each variant (compiled inside its patch) and
  reference, on far logits (``benchmark_inputs``' "far": every stick lasts beyond 16K keys)."""
  q, k, v, scale = benchmark_inputs("far", b, t, n, h, dtype)
  scale = jnp.float32(scale)
  flops = 4 * b * n * t * t * h / 2
  dense = attention("mosaic_dense", h, dtype)  # the op's default tiling, every key walked
  runs = [(name, functools.partial(ablated, name), dense, None) for name in variants]
  runs += [(name, contextlib.nullcontext, *reference(name, h, dtype)) for name in references]
  for name, context, fn, input_dtype in runs:
    args = (q, k, v) if input_dtype is None else (x.astype(input_dtype) for x in (q, k, v))
    args = (*args, scale)
    with context():
      compiled = jax.jit(fn).lower(*args).compile()
    ms = median_time_ms(compiled, args, iters)
    yield dict(name=name, shape=[b, t, n, h], dtype=jnp.dtype(args[0].dtype).name, ms=ms,
               tflops=flops / ms / 1e9)
