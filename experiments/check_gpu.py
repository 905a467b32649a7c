r"""GPU check of the Pallas kernels (interpret=False) against the float64 scan path.

Realistic shapes (T up to 16384, H 64 and 128, bf16, GQA, segments, attend_current), forward and
gradients under the tolerance rule of ``sbjax.testing``; saturated logits (|z| up to 1e4); logits
``-5 + N(0, 1)`` (sticks that last ~20K keys: every key walked, T up to 16384); ``skip_tolerance``
within its documented bounds (``testing.skip_tolerance_bounds``);
infinite query/key elements and forget gates (normal, saturated, +-inf), with gradients NaN only
where float64's are; long sequences (T=65536 forward and backward on one head, T=131072
forward); exact skipping (the default kernels bitwise equal to the dense walk); 20 backward runs
compared bitwise. The decode kernel (one step, ragged caches up to S=32768) against the float64
portable path, and its exact skipping bitwise equal to its dense walk. The Mosaic GPU kernels:
the forward (both structures) against float64 at T=4096 (far logits too), saturated logits and
T=65536, and its skipping; forward and gradients of the default the same way, plus infinities,
exact skipping and ``skip_tolerance`` of the gradients, and 20 backward runs compared bitwise.
Prints a PASS/FAIL table and exits non-zero on any failure.

  python experiments/check_gpu.py --out=experiments/results/check_gpu_h100.json
  python experiments/check_gpu.py --only=decode --quick
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import sbjax
from sbjax import context_parallel, testing
from sbjax.testing import Shape, random_inputs

from benchmark_lib import errors_beyond_ulp
import logs

_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes only (a smoke test).")
_ONLY = flags.DEFINE_string("only", None, "Run only the checks whose name contains this.")


def _pallas(seg, attend_current, block_sizes=None, implementation="pallas"):
  """``f(q, k, v, scale, forget_gate) -> (out, rem)`` on the compiled kernels."""
  return lambda q, k, v, s, g: sbjax.stick_breaking_attention(
      q, k, v, scale=s, segment_ids=seg, forget_gate=g, attend_current=attend_current,
      implementation=implementation, block_sizes=block_sizes, return_remainder=True)


def _default_block_sizes(implementation, head_dim, dtype):
  """The kernels' own default tiling (Mosaic GPU's or Triton's)."""
  config = sbjax.MosaicBlockSizes if implementation == "pallas_mosaic_gpu" else sbjax.BlockSizes
  return config.get_default(head_dim, dtype)


def _cotangents(q, v):
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.normal(size=q.shape[:3] + v.shape[-1:]), jnp.float32),
          jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32))


def _gate(shape, *, infinite=False):
  """Forget-gate logits ``[B, T, K]``: N(1, 3^2); with ``infinite``, some at +-inf and +-1e4."""
  g = np.random.default_rng(2).normal(size=(shape.b, shape.t, shape.k)) * 3.0 + 1.0
  if infinite:
    flat = g.reshape(-1)
    flat[1::7], flat[3::11], flat[4::13], flat[5::17] = np.inf, -np.inf, 1e4, -1e4
  return jnp.asarray(g, jnp.float32)


def _record(name, shape, dtype, got, want, same, *, nonfinite=False):
  record = dict(check=name, shape=str(shape), dtype=jnp.dtype(dtype).name, ok=True)
  errors = testing.tolerance_errors(got, want, same, dtype,
                                    nonfinite_like_reference=nonfinite)
  record["errors"] = {k: err for k, (err, _) in errors.items()}
  failures = [f"{k}: {err:.3g} > {bound:.3g}" for k, (err, bound) in errors.items()
              if not err <= bound]
  if failures:
    record["ok"], record["failure"] = False, "; ".join(failures)
  return record


def _far(q, k, shift):
  """``q, k`` with logits ``z = shift + N(0, (H-1)/H)`` at scale ``H^-0.5`` (head dim 0 carries the
  shift): each key takes a small share and sticks last long, as in heads that attend far back."""
  h = q.shape[-1]
  return q.at[..., 0].set(1.0), k.at[..., 0].set(shift * h**0.5)


def check_accuracy(name, shape, dtype, *, segments=False, attend_current=False, logit_scale=1.0,
                   gated=False, with_grads=True, same_precision=True, shift=None,
                   implementation="pallas", block_sizes=None):
  """Compares the kernels with the float64 scan path; returns a record with the errors.
  ``shift``: logits ``shift + N(0, 1)`` instead of N(0, logit_scale^2)."""
  q, k, v, seg = random_inputs(shape.t, shape, dtype, segments=segments, logit_scale=logit_scale)
  if shift is not None:
    q, k = _far(q, k, shift)
  gate = _gate(shape) if gated else None
  scale = shape.h**-0.5
  d_out, d_rem = _cotangents(q, v)
  attn = _pallas(seg, attend_current, block_sizes, implementation)
  if with_grads:
    got = jax.jit(functools.partial(testing.gradients, attn))(
        q, k, v, jnp.float32(scale), d_out, d_rem, gate)
    want = testing.float64_gradients(q, k, v, seg, scale, attend_current, d_out, d_rem, gate,
                                     implementation="scan")
    same = (testing.same_precision_gradients(q, k, v, seg, scale, attend_current, d_out, d_rem,
                                             gate) if same_precision else None)
  else:
    got = jax.jit(attn)(q, k, v, jnp.float32(scale), gate)
    want = testing.float64_result(q, k, v, seg, scale, attend_current, gate,
                                  implementation="scan")
    same = None
  return _record(name, shape, dtype, got, want, same)


def check_cross_chunk(name, shape, dtype, *, implementation, with_grads):
  """The cross-chunk mode of context parallelism (``chunk_attention(causal=False)``: every key of
  an earlier chunk visible, a fresh stick from its last key) with the queries' and keys' own
  segment ids (a run crossing the boundary) and a gate, against the float64 dense path."""
  q, k, v, k_seg = random_inputs(shape.t, shape, dtype, segments=True, logit_scale=2.0)
  q_seg = k_seg + k_seg[:, -1:]  # the keys' last segment goes on into the query chunk
  gate, scale = _gate(shape), shape.h**-0.5
  d_out, d_rem = _cotangents(q, v)
  kernels = lambda q, k, v, s, g: context_parallel.chunk_attention(
      q, k, v, causal=False, scale=s, segment_ids=q_seg, key_segment_ids=k_seg, forget_gate=g,
      implementation=implementation)
  cross = dict(causal=False, key_segment_ids=k_seg)
  if with_grads:
    got = jax.jit(functools.partial(testing.gradients, kernels))(
        q, k, v, jnp.float32(scale), d_out, d_rem, gate)
    want = testing.float64_gradients(q, k, v, q_seg, scale, False, d_out, d_rem, gate, **cross)
    same = testing.same_precision_gradients(q, k, v, q_seg, scale, False, d_out, d_rem, gate,
                                            **cross)
  else:
    got = jax.jit(kernels)(q, k, v, jnp.float32(scale), gate)
    want = testing.float64_result(q, k, v, q_seg, scale, False, gate, **cross)
    same = testing.same_precision_result(q, k, v, q_seg, scale, False, gate, **cross)
  return _record(name, shape, dtype, got, want, same)


def check_infinities(name, shape, dtype, *, where, implementation="pallas"):
  """Infinite inputs (``where="inputs"``: a key element at -inf, one at +inf, a query element at
  +inf, all in head dim 3) or gates (``"forget_gate"``): outputs finite and within tolerance,
  gradients NaN only where float64's are and equal to its infinities."""
  q, k, v, _ = random_inputs(shape.t, shape, dtype)
  gate = None
  if where == "forget_gate":
    gate = _gate(shape, infinite=True)
  else:
    q, k = np.array(q.astype(jnp.float32)), np.array(k.astype(jnp.float32))
    k[0, shape.t // 3, 0, 3], k[-1, shape.t // 5, -1, 3], q[-1, shape.t // 2, -1, 3] = (
        -np.inf, np.inf, np.inf)
    q, k = jnp.asarray(q, dtype), jnp.asarray(k, dtype)
  scale = shape.h**-0.5
  d_out, d_rem = _cotangents(q, v)
  got = jax.jit(functools.partial(testing.gradients, _pallas(None, False,
                                                             implementation=implementation)))(
      q, k, v, jnp.float32(scale), d_out, d_rem, gate)
  want = testing.float64_gradients(q, k, v, None, scale, False, d_out, d_rem, gate,
                                   implementation="scan")
  same = testing.same_precision_gradients(q, k, v, None, scale, False, d_out, d_rem, gate)
  record = _record(name, shape, dtype, got, want, same, nonfinite=True)
  if not (np.isfinite(np.asarray(got[0], np.float32)).all() and np.isfinite(got[1]).all()):
    record["ok"], record["failure"] = False, "non-finite out or rem"
  return record


def check_skip_tolerance(name, shape, dtype, *, tolerance, shift, implementation="pallas"):
  """``skip_tolerance`` on long sticks (logits ``shift + N(0, 1)``): every output and gradient
  element within ``testing.skip_tolerance_bounds`` of float64, on top of the kernels' own error
  (their dense walk's against float64, at least 1e-5 of the largest value), ``rem`` an upper
  bound of the dense walk's, and some rows really stopped early."""
  q, k, v, _ = random_inputs(shape.t, shape, dtype)
  q, k = _far(q, k, shift)
  scale = shape.h**-0.5
  d_out, d_rem = _cotangents(q, v)
  dense_sizes = dataclasses.replace(_default_block_sizes(implementation, shape.h, dtype),
                                    skip_used_stick=False)
  runs = []
  for tol, sizes in ((tolerance, None), (0.0, dense_sizes)):
    attn = lambda q, k, v, s, g, tol=tol, sizes=sizes: sbjax.stick_breaking_attention(
        q, k, v, scale=s, implementation=implementation, skip_tolerance=tol, block_sizes=sizes,
        return_remainder=True)
    runs.append([np.asarray(x, np.float64) for x in jax.jit(functools.partial(
        testing.gradients, attn))(q, k, v, jnp.float32(scale), d_out, d_rem)])
  got, dense = runs
  want = testing.float64_gradients(q, k, v, None, scale, False, d_out, d_rem,
                                   implementation="scan")
  bounds = testing.skip_tolerance_bounds(q, k, v, scale, d_out, d_rem, tolerance)
  record = dict(check=name, shape=str(shape), dtype=jnp.dtype(dtype).name, ok=True,
                error_over_bound={})
  for result, g, d, w, bound in zip(testing.RESULT_NAMES, got, dense, want, bounds):
    own = max(1e-5 * np.abs(w).max(), np.abs(d - w).max())
    excess = np.abs(g - w) - bound - own
    record["error_over_bound"][result] = float(np.max(np.abs(g - w) / (bound + own + 1e-30)))
    if not (np.isfinite(g).all() and excess.max() <= 0):
      record["ok"], record["failure"] = False, f"{result}: above its bound by {excess.max():.3g}"
  rem, rem_dense = got[1], dense[1]
  record["rows_stopped_early"] = float(np.mean(rem > 2.0 * rem_dense))
  if not ((rem >= rem_dense - 1e-6).all() and record["rows_stopped_early"] > 0.1):
    record["ok"], record["failure"] = False, "rem not an upper bound, or too few rows stopped"
  return record


def check_skipping_is_exact(name, shape, dtype, *, gated=False, implementation="pallas"):
  """Strong positive logits use every stick up early: the default (skipping) kernels must equal
  the dense walk bit for bit, forward and backward (the compiled kernels, not interpret mode)."""
  q, k, v, _ = random_inputs(shape.t, shape, jnp.float32, logit_scale=4.0)
  q, k, v = (q + 3.0).astype(dtype), (k + 1.0).astype(dtype), v.astype(dtype)
  gate = _gate(shape, infinite=True) if gated else None
  d_out, d_rem = _cotangents(q, v)
  default = _default_block_sizes(implementation, shape.h, dtype)
  results = []
  for block_sizes in (default, dataclasses.replace(default, skip_used_stick=False)):
    fn = jax.jit(functools.partial(testing.gradients,
                                   _pallas(None, False, block_sizes, implementation)))
    results.append([np.asarray(x) for x in fn(q, k, v, jnp.float32(0.25), d_out, d_rem, gate)])
  differ = {n: int(np.sum(a != b)) for n, a, b in zip(testing.RESULT_NAMES, *results)}
  ok = not any(differ.values()) and float(np.min(results[0][1])) == 0.0
  return dict(check=name, shape=str(shape), dtype=jnp.dtype(dtype).name, ok=ok,
              differing_elements=differ)


def check_mosaic_skipping(name, shape, block_sizes, *, tolerance, shift):
  """The Mosaic GPU forward's skipping against its own dense walk on logits ``shift + N(0, 1)``:
  bit for bit with ``tolerance=0`` (and some rows' sticks really used up); with a tolerance,
  ``|d out| <= tol max|v|`` plus an ulp of each rounded output, ``0 <= d rem <= tol``, and more
  than 10% of the rows stopped early."""
  q, k, v, _ = random_inputs(shape.t, shape, jnp.bfloat16)
  q, k = _far(q, k, shift)
  results = []
  for sizes in (block_sizes, dataclasses.replace(block_sizes, skip_used_stick=False)):
    fn = jax.jit(lambda q, k, v, s, sizes=sizes: sbjax.stick_breaking_attention(
        q, k, v, scale=s, implementation="pallas_mosaic_gpu", block_sizes=sizes,
        skip_tolerance=tolerance, return_remainder=True))
    results.append([np.asarray(x, np.float64) for x in fn(q, k, v, jnp.float32(shape.h**-0.5))])
  (out, rem), (out_d, rem_d) = results
  record = dict(check=name, shape=str(shape), dtype="bfloat16", skip_tolerance=tolerance,
                rows_stopped_early=float(np.mean(rem > 2.0 * rem_d)))
  if tolerance == 0:
    record["differing_elements"] = dict(out=int(np.sum(out != out_d)), rem=int(np.sum(rem != rem_d)))
    record["ok"] = not any(record["differing_elements"].values()) and float(rem.min()) == 0.0
  else:
    record["max_err_beyond_ulp"] = errors_beyond_ulp(out, out_d, v, jnp.bfloat16)[
        "max_err_beyond_ulp"]
    record["ok"] = bool(record["max_err_beyond_ulp"] <= tolerance and np.isfinite(out).all()
                        and (rem >= rem_d - 1e-6).all() and (rem - rem_d <= tolerance).all()
                        and record["rows_stopped_early"] > 0.1)
  return record


def check_determinism(name, runs=20, implementation="pallas", block_sizes=None):
  """``runs`` backward runs with segments and a gate, compared bit for bit."""
  shape = Shape(2, 4096, 8, 2, 128)
  q, k, v, seg = random_inputs(0, shape, jnp.bfloat16, segments=True)
  gate = _gate(shape)
  d_out, d_rem = _cotangents(q, v)
  fn = jax.jit(functools.partial(testing.gradients,
                                 _pallas(seg, False, block_sizes, implementation)))
  first = [np.asarray(x) for x in fn(q, k, v, jnp.float32(0.1), d_out, d_rem, gate)]
  same = all(
      all(np.array_equal(a, np.asarray(b))
          for a, b in zip(first, fn(q, k, v, jnp.float32(0.1), d_out, d_rem, gate)))
      for _ in range(runs - 1))
  return dict(check=name, shape=str(shape), dtype="bfloat16", gated=True, ok=bool(same))


def _decode_inputs(b, s, n, k, h, dtype, *, logit_scale=1.0):
  """``(query [B, 1, N, H] (N(0, 1) times logit_scale), key_cache, value_cache [B, S, K, H] (N(0,
  1)), cache_len [B])`` on the device; rows filled to S, S - 1, 1 key, chunk edges and between."""
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = (jax.random.normal(kq, (b, 1, n, h)) * logit_scale).astype(dtype)
  cache = lambda key: jax.random.normal(key, (b, s, k, h), dtype)
  lengths = np.resize([s, s - 1, 1, 513, s // 2 + 17, 4097, 1000, s - 511], b).clip(1, s)
  return q, cache(kk), cache(kv), jnp.asarray(lengths, jnp.int32)


def _pallas_decode(attend_current, skip_tolerance=0.0, interpret=False):
  return jax.jit(lambda q, kc, vc, n, g: sbjax.stick_breaking_decode(
      q, kc, vc, n, forget_gate_cache=g, attend_current=attend_current, return_remainder=True,
      implementation="pallas", skip_tolerance=skip_tolerance, interpret=interpret))


@functools.partial(jax.jit, static_argnames="attend_current")
def _float64_decode(q, kc, vc, n, g, *, attend_current):
  return sbjax.stick_breaking_decode(q, kc, vc, n, forget_gate_cache=g, return_remainder=True,
                                     attend_current=attend_current, implementation="xla")


def check_decode(name, b, s, n, k, h, dtype, *, attend_current=False, gated=False,
                 logit_scale=1.0, interpret=False):
  """One decode step (Q=1) of the Pallas kernel against the portable path in float64 (whose exact
  skipping is bitwise its full read): out and rem under the tolerance rule's cap (no
  same-precision decode to compare with at these lengths), ragged cache_len."""
  q, kc, vc, cache_len = _decode_inputs(b, s, n, k, h, dtype, logit_scale=logit_scale)
  gate = _gate(Shape(b, s, n, k, h), infinite=True) if gated else None
  got = _pallas_decode(attend_current, interpret=interpret)(q, kc, vc, cache_len, gate)
  with jax.enable_x64(True):
    up = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
    want = [np.asarray(x) for x in _float64_decode(
        up(q), up(kc), up(vc), cache_len, up(gate), attend_current=attend_current)]
  return _record(name, f"B{b}-S{s}-N{n}-K{k}-H{h}", dtype, got, want, None)


def check_decode_skipping_is_exact(name, b, s, n, k, h, dtype, *, gated=False, interpret=False):
  """N(0, 1) logits use sticks up within a few hundred keys: the kernel's exact skipping must give
  the bits of its dense walk (``skip_tolerance=None``)."""
  q, kc, vc, cache_len = _decode_inputs(b, s, n, k, h, dtype)
  gate = _gate(Shape(b, s, n, k, h), infinite=True) if gated else None
  results = [[np.asarray(x) for x in _pallas_decode(False, tol, interpret)(
      q, kc, vc, cache_len, gate)] for tol in (0.0, None)]
  differ = {key: int(np.sum(x != y)) for key, x, y in zip(("out", "rem"), *results)}
  ok = not any(differ.values()) and float(np.min(results[0][1])) == 0.0
  return dict(check=name, shape=f"B{b}-S{s}-N{n}-K{k}-H{h}", dtype=jnp.dtype(dtype).name, ok=ok,
              differing_elements=differ)


def decode_checks(quick: bool):
  """The decode kernel's ``(name, fn)`` pairs: S=4096 with ``quick``, else also S=32768."""
  bf16 = jnp.bfloat16
  named = lambda fn: lambda name, *a, **kw: (name, functools.partial(fn, name, *a, **kw))
  acc, skip = named(check_decode), named(check_decode_skipping_is_exact)
  for b, s in ((2, 4096),) if quick else ((2, 4096), (8, 32768)):
    yield acc(f"decode S{s}", b, s, 12, 4, 128, bf16)
    yield acc(f"decode S{s} cur gate", b, s, 12, 4, 128, bf16, attend_current=True, gated=True)
    yield acc(f"decode S{s} |z|<=1e4", b, s, 12, 12, 128, bf16, logit_scale=1250.0)
    yield skip(f"decode S{s} skip exact", b, s, 12, 4, 128, bf16, gated=True)


def checks(quick: bool):
  """``(name, fn)`` pairs; each ``fn()`` returns a record."""
  bf16 = jnp.bfloat16
  named = lambda fn: lambda name, *a, **kw: (name, functools.partial(fn, name, *a, **kw))
  acc, inf, skip = named(check_accuracy), named(check_infinities), named(check_skipping_is_exact)
  yield acc("small fp32", Shape(1, 300, 4, 2, 64), jnp.float32, segments=True)
  yield acc("small fp16", Shape(1, 300, 4, 1, 80), jnp.float16, attend_current=True)
  yield acc("small fp32 gate", Shape(1, 333, 4, 2, 40, hv=24), jnp.float32, segments=True,
            gated=True)
  yield inf("inf q/k bf16", Shape(2, 1000, 4, 2, 64), bf16, where="inputs")
  yield inf("inf q/k fp32", Shape(2, 1000, 4, 2, 72), jnp.float32, where="inputs")
  yield inf("inf gate bf16", Shape(2, 1000, 4, 2, 64), bf16, where="forget_gate")
  yield skip("skip exact bf16", Shape(1, 2000, 2, 1, 64), bf16)
  yield skip("skip exact fp32 gate", Shape(1, 2000, 2, 1, 64), jnp.float32, gated=True)
  yield acc("H128 T4096", Shape(2, 4096, 4, 2, 128), bf16)
  yield acc("H64 T4096 seg cur", Shape(1, 4096, 4, 4, 64), bf16, segments=True,
            attend_current=True)
  yield acc("H96 T3000 MQA gate", Shape(1, 3000, 4, 1, 96), bf16, gated=True)
  yield acc("saturated |z|<=1e4", Shape(1, 2048, 2, 2, 64), bf16, logit_scale=1250.0)
  yield acc("far H128 T4096", Shape(2, 4096, 4, 2, 128), bf16, shift=-5.0)
  yield acc("far fp16 T4096", Shape(1, 4096, 2, 1, 64), jnp.float16, shift=-5.0)
  yield named(check_skip_tolerance)("skip_tolerance 1e-3 fp32", Shape(1, 4096, 2, 1, 64),
                                    jnp.float32, tolerance=1e-3, shift=-5.0)
  yield named(check_cross_chunk)("cross-chunk T2000 GQA seg gate", Shape(1, 2000, 4, 2, 64), bf16,
                                 implementation="pallas_triton", with_grads=True)
  yield from decode_checks(quick)
  yield from mosaic_checks(quick)
  if quick:
    return
  yield acc("H128 T16384", Shape(1, 16384, 2, 1, 128), bf16, same_precision=False)
  yield acc("far H128 T16384", Shape(1, 16384, 2, 1, 128), bf16, same_precision=False,
            shift=-5.0)
  yield acc("H64 T16384 seg gate", Shape(1, 16384, 2, 2, 64), bf16, segments=True, gated=True,
            same_precision=False)
  yield acc("T65536 one head", Shape(1, 65536, 1, 1, 64), bf16, same_precision=False)
  yield acc("T131072 fwd", Shape(1, 131072, 1, 1, 64), bf16, with_grads=False,
            same_precision=False)
  yield "determinism x20", functools.partial(check_determinism, "determinism x20")


def mosaic_checks(quick: bool):
  """The Mosaic GPU kernels (``pallas_mosaic_gpu``): the forward in both of its structures (one
  warpgroup, and the op's default: two consumer warpgroups with a producer, FA3's scheduling)
  and its skipping; forward and backward with the default against float64 (far and saturated
  logits, infinities, segments, gate, T=65536), exact skipping bitwise, ``skip_tolerance``
  within its bounds, and 20 backward runs bitwise."""
  bf16, impl = jnp.bfloat16, "pallas_mosaic_gpu"
  structures = {"1wg": sbjax.MosaicBlockSizes(),
                "default": sbjax.MosaicBlockSizes.get_default(128, bf16)}
  for tag, sizes in structures.items():
    grads = tag == "default"  # the backward kernels are the same for both structures
    acc = lambda name, *a, sizes=sizes, grads=grads, tag=tag, **kw: (
        f"mosaic {tag} {name}", functools.partial(
            check_accuracy, f"mosaic {tag} {name}", *a, with_grads=grads, implementation=impl,
            block_sizes=sizes, **kw))
    yield acc("H128 T4096", Shape(2, 4096, 4, 2, 128), bf16)
    yield acc("H64 T3000 cur fp16", Shape(1, 3000, 4, 1, 64), jnp.float16, attend_current=True)
    yield acc("far H128 T4096", Shape(2, 4096, 4, 2, 128), bf16, shift=-5.0)
    yield acc("saturated |z|<=1e4", Shape(1, 2048, 2, 2, 64), bf16, logit_scale=1250.0)
    yield acc("H64 T4096 GQA gate seg", Shape(1, 4096, 4, 2, 64), bf16, gated=True,
              segments=True)
    for tol, shift in ((0.0, -2.0), (1e-3, -5.0)):  # walks that end at ~1K keys; far sticks
      name = f"mosaic {tag} skip_tolerance {tol:g}"
      yield name, functools.partial(check_mosaic_skipping, name, Shape(2, 4096, 4, 2, 128),
                                    sizes, tolerance=tol, shift=shift)
    if not quick:
      yield acc("T65536 one head", Shape(1, 65536, 1, 1, 64), bf16, same_precision=False)
  # The dk/dv kernel's 64-key tiles (MosaicBlockSizes.block_k_dkv; the default takes 32).
  whole = dataclasses.replace(structures["default"], block_k_dkv=64)
  for name, shape, kw in (("H128 T4096", Shape(2, 4096, 4, 2, 128), {}),
                          ("saturated |z|<=1e4", Shape(1, 2048, 2, 2, 64),
                           dict(logit_scale=1250.0)),
                          ("H64 T4096 GQA gate seg", Shape(1, 4096, 4, 2, 64),
                           dict(gated=True, segments=True))):
    yield f"mosaic dkvk64 {name}", functools.partial(
        check_accuracy, f"mosaic dkvk64 {name}", shape, bf16, implementation=impl,
        block_sizes=whole, **kw)
  named = lambda fn, name, *a, **kw: (f"mosaic {name}", functools.partial(
      fn, f"mosaic {name}", *a, implementation=impl, **kw))
  yield named(check_cross_chunk, "cross-chunk T2000 GQA seg gate", Shape(1, 2000, 4, 2, 64), bf16,
              with_grads=True)
  yield named(check_infinities, "inf q/k bf16", Shape(2, 1000, 4, 2, 64), bf16, where="inputs")
  yield named(check_infinities, "inf gate bf16", Shape(2, 1000, 4, 2, 64), bf16,
              where="forget_gate")
  yield named(check_skipping_is_exact, "skip exact bf16 gate", Shape(1, 2000, 2, 1, 64), bf16,
              gated=True)
  yield named(check_skip_tolerance, "skip_tolerance 1e-3 gradients", Shape(1, 4096, 2, 1, 64),
              bf16, tolerance=1e-3, shift=-5.0)
  if not quick:
    yield named(check_determinism, "determinism x20")


def main(argv):
  del argv
  logs.install()
  print(jax.__version__, jax.devices()[0].device_kind, flush=True)
  records = []
  for name, check in checks(_QUICK.value):
    if _ONLY.value and _ONLY.value not in name:
      continue
    start = time.time()
    try:
      rec = check()
    except Exception as e:  # pylint: disable=broad-except
      rec = dict(check=name, ok=False, failure=f"{type(e).__name__}: {e}"[:400])
    rec["seconds"] = round(time.time() - start, 1)
    print(json.dumps(rec), flush=True)
    records.append(rec)
    if _OUT.value:  # after every check, so that a run cut short keeps what it found
      with open(_OUT.value, "w") as f:
        json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                       date=time.strftime("%Y-%m-%d"), records=records), f, indent=1)
  print(f"\n{'check':24} {'shape':28} {'dtype':9} {'result':6} worst error")
  for r in records:
    worst = max(r.get("errors", {"-": 0}).items(), key=lambda kv: kv[1])
    print(f"{r['check']:24} {r.get('shape', ''):28} {r.get('dtype', ''):9} "
          f"{'PASS' if r['ok'] else 'FAIL':6} {worst[0]}={worst[1]:.2e}")
  print(f"{sum(r['ok'] for r in records)}/{len(records)} passed")
  sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
  app.run(main)
