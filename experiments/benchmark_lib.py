r"""Logic of experiments/benchmark.py (importable without its flags): the logit regimes, the
implementations, the timed run and its table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import sbjax
from sbjax.testing import median_time_ms


REGIMES = ("local", "far", "mixed", "retrieval", "trained")
IMPLEMENTATIONS = ("pallas", "pallas_dense", "pallas_tol", "mosaic", "mosaic_dense", "mosaic_tol",
                   "cudnn", "scan")
# Triton or Mosaic GPU, each forced (on Hopper "pallas" itself takes the Mosaic forward where
# it is not differentiated): the default (exact skipping), the dense walk, skip_tolerance.
_KERNELS = {"pallas": "pallas_triton", "mosaic": "pallas_mosaic_gpu"}
# Counted work of each pass in causal forwards (4 B N T^2 H / 2 flops): the backward as 2.5.
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
TRAINED_QK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                          "length_extrapolation", "qk_stickbreaking.npz")


def _shifted(rng, b, t, n, h, shift, dtype):
  """q, k with ``z = q . k / sqrt(h) = shift + N(0, (h-1)/h)``: coordinate 0 carries the shift
  (``shift [B, T, N]`` per key), the others are N(0, 1)."""
  q, k = rng.normal(size=(2, b, t, n, h))
  q[..., 0] = 1.0
  k[..., 0] = shift * np.sqrt(h)
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype)


def load_trained(path: str = TRAINED_QK):
  """``(query [4096, 6, 64], key [4096, 6, 64], scale)``: the npz's (layer, head) pairs as 6 heads."""
  data = np.load(path)
  q, k = (np.asarray(data[name][:, 0], np.float32) for name in ("query", "key"))  # [L, T, 2, 64]
  pairs = lambda x: np.einsum("LTNH->TLNH", x).reshape(x.shape[1], -1, x.shape[-1])
  return pairs(q), pairs(k), float(data["scale"])


def _trained(b, t, n, h, dtype):
  """The saved trained heads (``[layers, 1, T0, heads, H0]``) tiled to ``[b, t, n, h]``: heads
  repeated over N, positions over T, and the head dim doubled (``[q, q] . [k, k] = 2 q . k``, so
  the scale is halved to keep the logits). Returns ``(q, k, scale)``."""
  q0, k0, scale = load_trained()  # [T0, 6, H0] each
  reps_h = h // q0.shape[-1]
  if reps_h * q0.shape[-1] != h:
    raise ValueError(f"trained regime needs H a multiple of {q0.shape[-1]}, got H={h}.")
  tile = lambda x: np.tile(x, (-(-t // x.shape[0]), -(-n // x.shape[1]), reps_h))[:t, :n]
  q, k = (np.broadcast_to(tile(x)[None], (b, t, n, h)) for x in (q0, k0))
  return jnp.asarray(q, dtype), jnp.asarray(k, dtype), scale / reps_h


def benchmark_inputs(regime: str, b: int, t: int, n: int, h: int, dtype, seed: int = 0):
  """``(q, k, v, scale)`` of one regime (see the module docstring), ``[B, T, N, H]`` each."""
  rng = np.random.default_rng(seed)
  v = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
  scale = 1.0 / np.sqrt(h)
  if regime == "local":
    shift = np.zeros((b, t, n))
  elif regime == "far":
    shift = np.full((b, t, n), -5.0)
  elif regime == "mixed":
    shift = np.where(np.arange(n) < n // 2, 0.0, -5.0) * np.ones((b, t, 1))
  elif regime == "retrieval":
    shift = np.where(rng.random((b, t, n)) < 0.01, 10.0, -6.0)
  elif regime == "trained":
    q, k, scale = _trained(b, t, n, h, dtype)
    return q, k, v, scale
  else:
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}.")
  q, k = _shifted(rng, b, t, n, h, shift, dtype)
  return q, k, v, scale


def attention(impl: str, head_dim: int, dtype, block_sizes=None, skip_tolerance=1e-3,
              mosaic_block_sizes=None):
  """``f(q, k, v, scale) -> out`` of one implementation."""
  if impl == "cudnn":  # cuDNN takes a static scale: the default 1/sqrt(H)
    return lambda q, k, v, s: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
  if impl == "scan":
    return lambda q, k, v, s: sbjax.stick_breaking_attention(q, k, v, scale=s,
                                                             implementation="scan")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"impls must be among {IMPLEMENTATIONS}, got {impl!r}.")
  kernel, _, variant = impl.partition("_")
  if kernel == "mosaic":
    block_sizes = mosaic_block_sizes or sbjax.MosaicBlockSizes.get_default(head_dim, dtype)
  else:
    block_sizes = block_sizes or sbjax.BlockSizes.get_default(head_dim, dtype)
  if variant == "dense":
    block_sizes = dataclasses.replace(block_sizes, skip_used_stick=False)
  tolerance = skip_tolerance if variant == "tol" else 0.0
  return lambda q, k, v, s: sbjax.stick_breaking_attention(
      q, k, v, scale=s, implementation=_KERNELS[kernel], block_sizes=block_sizes,
      skip_tolerance=tolerance)


def _vjp(attn, q, k, v, s):
  """``(out, pullback)`` of ``attn`` at ``(q, k, v)`` (``jax.vjp``'s, the pullback holding its
  residuals)."""
  return jax.vjp(lambda q, k, v: attn(q, k, v, s), q, k, v)


def _vjp_fn(attn, q, k, v, s):
  """The pullback with its residuals computed (a compiled forward run), for timing it alone."""
  return jax.jit(lambda q, k, v, s: _vjp(attn, q, k, v, s)[1])(q, k, v, s)


def _fwd_bwd(attn, q, k, v, s, do):
  """``(out, (dq, dk, dv))``: the output is returned, as a training step uses it, so that XLA
  cannot drop the forward kernel (the kernels' residuals are the inputs, so the gradients alone
  do not need the forward to run)."""
  out, pullback = _vjp(attn, q, k, v, s)
  return out, pullback(do)


def compile_pass(attn, mode, args):
  """``(compiled, peak_bytes)`` of one pass of ``attn`` (``PASS_FLOPS``' modes) on ``args``:
  ``(q, k, v, scale)``, plus ``d_out`` for fwd+bwd; ``(pullback, d_out)`` for bwd."""
  if mode == "fwd":
    fn = jax.jit(attn)
  elif mode == "bwd":  # args: (pullback, d_out)
    fn = jax.jit(lambda pullback, do: pullback(do))
  else:
    fn = jax.jit(functools.partial(_fwd_bwd, attn))
  compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  peak = None if mem is None else int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                      + mem.temp_size_in_bytes)
  return compiled, peak


def errors_beyond_ulp(out, dense, v, dtype):
  """``max_err``: max|out - dense| / max|v|; ``max_err_beyond_ulp``: the same after taking one
  ulp of ``dense`` off each difference (the two outputs are rounded to ``dtype`` separately, so
  they may differ by an ulp whatever the tolerance); the latter is what the bound covers."""
  diff = np.abs(out - dense)
  exponent = np.floor(np.log2(np.maximum(np.abs(dense), np.finfo(np.float32).tiny)))
  ulp = np.exp2(exponent - jnp.finfo(dtype).nmant)
  v_max = float(np.abs(np.asarray(v, np.float32)).max())
  return dict(max_err=float(diff.max() / v_max),
              max_err_beyond_ulp=float(np.maximum(diff - ulp, 0.0).max() / v_max))


def run(shapes, regimes, impls, modes, dtype, iters, *, block_sizes=None, skip_tolerance=1e-3,
        max_scan_t=16384, slow_iters=3, mosaic_block_sizes=None, log=print):
  """Benchmark records (see the module docstring); an implementation that fails records its
  error instead of stopping the run."""
  bad = [m for m in modes if m not in PASS_FLOPS]
  if bad:
    raise ValueError(f"modes must be among {tuple(PASS_FLOPS)}, got {bad}.")
  meta = dict(dtype=jnp.dtype(dtype).name, jax=jax.__version__, gpu=jax.devices()[0].device_kind)
  records = []
  for b, n, h, t in shapes:
    inputs = {}  # regime -> (q, k, v, scale), made once per shape (the NumPy draws take seconds)
    d_out = None
    for mode in modes:
      flops = 4 * b * n * t * t * h / 2 * PASS_FLOPS[mode]
      dense_out = {}
      for impl in impls:
        if impl == "scan" and t > max_scan_t:
          continue
        # Softmax and the scan path cost the same on any logits: one regime ("any").
        impl_regimes = regimes if impl.startswith(tuple(_KERNELS)) else ["any"]
        compiled = None
        for regime in impl_regimes:
          rec = dict(implementation=impl, regime=regime, T=t, B=b, N=n, H=h, **{"pass": mode},
                     **meta)
          if impl.endswith("_tol"):
            rec["skip_tolerance"] = skip_tolerance
          try:
            name = "local" if regime == "any" else regime
            if name not in inputs:
              inputs[name] = benchmark_inputs(name, b, t, n, h, dtype)
            q, k, v, scale = inputs[name]
            args = (q, k, v, jnp.float32(scale))
            if mode != "fwd":
              if d_out is None:
                d_out = jnp.asarray(np.random.default_rng(1).normal(size=v.shape), dtype)
              args += (d_out,)
            attn = attention(impl, h, dtype, block_sizes, skip_tolerance, mosaic_block_sizes)
            if mode == "bwd":  # the backward alone, from held residuals
              args = (_vjp_fn(attn, *args[:4]), d_out)
            if compiled is None or mode == "bwd":  # each regime's pullback: its own treedef
              compiled, rec["peak_bytes"] = compile_pass(attn, mode, args)
            ms = median_time_ms(compiled, args, slow_iters if impl == "scan" else iters)
            rec.update(ms=ms, tflops=flops / ms / 1e9)
            if mode == "fwd" and impl.endswith(("_dense", "_tol")):
              out = np.asarray(compiled(*args), np.float32)
              if impl.endswith("_dense"):
                dense_out[impl, regime] = out
              elif (dense := dense_out.get((impl.replace("_tol", "_dense"), regime))) is not None:
                rec.update(errors_beyond_ulp(out, dense, v, dtype))
          except Exception as e:  # pylint: disable=broad-except
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
          log(json.dumps(rec))
          records.append(rec)
  return records


def format_table(records) -> str:
  lines = [f"{'implementation':14} {'regime':9} {'pass':7} {'T':>6} {'ms':>9} {'TFLOP/s':>8} "
           f"{'GiB':>6} {'err>ulp':>8}"]
  for r in records:
    head = f"{r['implementation']:14} {r['regime']:9} {r['pass']:7} {r['T']:>6}"
    if "error" in r:
      lines.append(f"{head} ERROR {r['error'][:60]}")
      continue
    gib = "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.2f}"
    err = f"{r['max_err_beyond_ulp']:.1e}" if "max_err" in r else ""
    lines.append(f"{head} {r['ms']:9.3f} {r['tflops']:8.1f} {gib:>6} {err:>8}")
  return "\n".join(lines)
