"""Utilities for comparing stick-breaking implementations: the tolerance rule, inputs, the oracle.

Used by sbjax's own tests and GPU check, and by users who test their own implementations or models
against the float64 definition.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sbjax import ops, reference
from sbjax.common import compute_dtype

# The tolerance rule, stated once. An implementation's relative RMS error against the float64
# result must be at most twice that of a same-precision computation (the reference with its math in
# the input dtype) plus a noise floor, and under an absolute cap per dtype.
NOISE_FLOOR = {jnp.dtype(d): x for d, x in ((jnp.float32, 1e-5), (jnp.bfloat16, 4e-3), (jnp.float16, 1e-3))}
REL_RMS_CAP = {jnp.dtype(d): x for d, x in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2), (jnp.float16, 4e-3))}


def _flat(tree):
  """An array as float64, or a pytree's leaves raveled into one float64 vector."""
  leaves = jax.tree.leaves(tree)
  if len(leaves) == 1 and leaves[0] is tree:
    return np.asarray(tree, np.float64)
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])


def rel_rms(x, ref) -> float:
  """Relative RMS error ``|x - ref| / |ref|`` in float64; fails if either side is not finite.

  ``x`` and ``ref`` are arrays or pytrees of the same structure (e.g. parameters or gradients),
  whose leaves are compared all together.
  """
  x, ref = (_flat(t) for t in (x, ref))
  if x.shape != ref.shape:
    raise ValueError(f"rel_rms compares equal shapes, got {x.shape} and reference {ref.shape}")
  for name, values in (("result", x), ("reference", ref)):
    if not np.isfinite(values).all():
      raise AssertionError(f"{np.sum(~np.isfinite(values))} non-finite values in the {name}")
  return float(np.sqrt(np.mean((x - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))


def tolerance_bound(same_precision_err: float, dtype) -> float:
  """The largest relative RMS error the tolerance rule allows in ``dtype``."""
  dtype = jnp.dtype(dtype)
  return min(2 * same_precision_err + NOISE_FLOOR[dtype], REL_RMS_CAP[dtype])


def assert_within_tolerance(err: float, same_precision_err: float, dtype, what: str = ""):
  """The tolerance rule above for a relative RMS error ``err`` of an output named ``what``."""
  bound = tolerance_bound(same_precision_err, dtype)
  if not err <= bound:
    raise AssertionError(
        f"{what}: rel RMS error {err:.3g} > bound {bound:.3g} "
        f"(same-precision error {same_precision_err:.3g}, dtype {jnp.dtype(dtype).name})")


@dataclasses.dataclass(frozen=True)
class Shape:
  b: int
  t: int
  n: int
  k: int
  h: int
  hv: int | None = None

  def __str__(self):
    return f"B{self.b}-T{self.t}-N{self.n}-K{self.k}-H{self.h}" + (f"-Hv{self.hv}" if self.hv else "")


def random_inputs(seed: int, shape: Shape, dtype, *, segments: bool = False, logit_scale=1.0):
  """Normal q, k, v in ``dtype`` (q scaled by ``logit_scale``) and optional sorted segment ids."""
  rng = np.random.default_rng(seed)
  s = shape
  q = rng.normal(size=(s.b, s.t, s.n, s.h)) * logit_scale
  k = rng.normal(size=(s.b, s.t, s.k, s.h))
  v = rng.normal(size=(s.b, s.t, s.k, s.hv or s.h))
  seg = np.sort(rng.integers(0, 3, size=(s.b, s.t)), axis=1).astype(np.int32) if segments else None
  # float64 stays NumPy so that callers can move it into a jax.enable_x64 scope.
  cast = (lambda x: np.asarray(x, dtype)) if dtype == np.float64 else (lambda x: jnp.asarray(x, dtype))
  return cast(q), cast(k), cast(v), None if seg is None else jnp.asarray(seg)


def _up(x):
  """``x`` as a float64 jax array (call inside ``jax.enable_x64``); None stays None."""
  return None if x is None else jnp.asarray(np.asarray(x, np.float64))


def _attention(implementation, seg, attend_current, dtype=None, cross=None):
  """``f(q, k, v, scale, forget_gate) -> (out, rem)``; ``dtype`` set: the same-precision reference.
  ``cross``: None, or the cross-chunk mode's ``{"key_segment_ids": [B, T] or None}`` (the dense
  reference: the ops take that mode through ``sbjax.context_parallel`` only)."""
  if dtype is not None or cross is not None:
    extra = {} if cross is None else dict(causal=False, **cross)
    return lambda q, k, v, s, g: reference.stick_breaking_attention(
        q, k, v, s, seg, g, attend_current=attend_current, dtype=dtype, **extra)
  return lambda q, k, v, s, g: ops.stick_breaking_attention(
      q, k, v, scale=s, segment_ids=seg, forget_gate=g, attend_current=attend_current,
      implementation=implementation, return_remainder=True)


def _cross(causal: bool, key_segment_ids):
  """The oracles' ``cross`` argument (a pytree, traced) for ``causal`` and the keys' ids."""
  if causal and key_segment_ids is not None:
    raise ValueError("key_segment_ids applies to causal=False (the cross-chunk mode) only.")
  return None if causal else {"key_segment_ids": key_segment_ids}


# Jitted once at module level (static: implementation, attend_current, math dtype), so that
# repeated oracle calls on the same shapes, e.g. one case in several input dtypes, compile once.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _result(implementation, attend_current, dtype, q, k, v, scale, seg, forget_gate, cross=None):
  return _attention(implementation, seg, attend_current, dtype, cross)(q, k, v, scale,
                                                                       forget_gate)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _gradients(implementation, attend_current, dtype, q, k, v, scale, seg, d_out, d_rem,
               forget_gate, cross=None):
  fn = _attention(implementation, seg, attend_current, dtype, cross)
  return gradients(fn, q, k, v, scale, d_out, d_rem, forget_gate)


def float64_result(q, k, v, seg, scale, attend_current, forget_gate=None, *,
                   implementation="xla", causal=True, key_segment_ids=None):
  """The oracle: ``(out, rem)`` as float64 NumPy arrays, computed in float64 on the (already
  rounded) inputs by ``implementation`` (``"xla"``, the dense reference; ``"scan"`` for long T).
  ``causal=False``: the cross-chunk mode of ``sbjax.context_parallel.chunk_attention`` (the dense
  reference), ``seg`` the queries' segment ids and ``key_segment_ids`` the keys'."""
  cross = _cross(causal, key_segment_ids)
  with jax.enable_x64(True):
    res = _result(implementation, attend_current, None, _up(q), _up(k), _up(v),
                  jnp.float64(scale), seg, _up(forget_gate), cross)
    return tuple(np.asarray(x) for x in res)


def same_precision_result(q, k, v, seg, scale, attend_current, forget_gate=None, *,
                          causal=True, key_segment_ids=None):
  """``(out, rem)`` of the dense reference with its math in the input dtype (the tolerance
  rule's yardstick for a forward); ``causal``, ``key_segment_ids`` as :func:`float64_result`."""
  scale = jnp.asarray(scale, compute_dtype(q.dtype))
  return _result("xla", attend_current, jnp.dtype(q.dtype), q, k, v, scale, seg, forget_gate,
                 _cross(causal, key_segment_ids))


def gradients(fn, q, k, v, scale, d_out, d_rem, forget_gate=None):
  """``(out, rem, dq, dk, dv, dscale[, dforget_gate])`` of ``fn(q, k, v, scale, forget_gate) ->
  (out, rem)`` under the cotangents ``d_out [B, T, N, Hv]`` and ``d_rem [B, T, N]`` (cast to the
  outputs' dtypes). ``dforget_gate`` is there only when ``forget_gate`` is given."""
  if forget_gate is None:
    f = lambda q, k, v, s: fn(q, k, v, s, None)
    primals = (q, k, v, scale)
  else:
    f, primals = fn, (q, k, v, scale, forget_gate)
  (out, rem), vjp = jax.vjp(f, *primals)
  d_out, d_rem = jnp.asarray(d_out, out.dtype), jnp.asarray(d_rem, rem.dtype)
  return (out, rem) + tuple(vjp((d_out, d_rem)))


def float64_gradients(q, k, v, seg, scale, attend_current, d_out, d_rem, forget_gate=None, *,
                      implementation="xla", causal=True, key_segment_ids=None):
  """The gradient oracle: :func:`gradients` of the op in float64 on the (already rounded) inputs,
  as float64 NumPy arrays. ``implementation="scan"`` keeps memory O(T) for long sequences;
  ``causal``, ``key_segment_ids`` as :func:`float64_result`.

  The cotangents are first rounded as :func:`gradients` rounds them for the op in ``q.dtype``
  (``d_out`` to ``q.dtype``, ``d_rem`` to float32), so that both see the same ones.
  """
  d_out = jnp.asarray(d_out, q.dtype)
  d_rem = jnp.asarray(d_rem, compute_dtype(q.dtype))
  with jax.enable_x64(True):
    res = _gradients(implementation, attend_current, None, _up(q), _up(k), _up(v),
                     jnp.float64(scale), seg, _up(d_out), _up(d_rem), _up(forget_gate),
                     _cross(causal, key_segment_ids))
    return tuple(np.asarray(x) for x in res)


def same_precision_gradients(q, k, v, seg, scale, attend_current, d_out, d_rem, forget_gate=None,
                             *, causal=True, key_segment_ids=None):
  """:func:`gradients` of the dense reference with its math in the input dtype: what a
  same-precision computation gets wrong, the yardstick of the tolerance rule; ``causal``,
  ``key_segment_ids`` as :func:`float64_result`."""
  scale = jnp.asarray(scale, compute_dtype(q.dtype))
  return _gradients("xla", attend_current, jnp.dtype(q.dtype), q, k, v, scale, seg, d_out, d_rem,
                    forget_gate, _cross(causal, key_segment_ids))


RESULT_NAMES = ("out", "rem", "dq", "dk", "dv", "dscale", "dforget_gate")


def assert_nonfinite_like(x, ref, what: str = ""):
  """``x`` is NaN only where ``ref`` is, and infinite (same sign) wherever ``ref`` is infinite."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  extra_nan = np.isnan(x) & ~np.isnan(ref)
  if extra_nan.any():
    raise AssertionError(f"{what}: {extra_nan.sum()} NaN where the reference has none, "
                         f"first at {tuple(int(i) for i in np.argwhere(extra_nan)[0])}")
  inf = np.isinf(ref)
  if not np.array_equal(x[inf], ref[inf]):
    raise AssertionError(f"{what}: {np.sum(x[inf] != ref[inf])} of the reference's "
                         f"{inf.sum()} infinite values differ")


def tolerance_errors(got, want, same, dtype, names=RESULT_NAMES, *,
                     nonfinite_like_reference=False) -> dict[str, tuple[float, float]]:
  """``{name: (rel RMS error, bound)}`` of each ``got`` against the float64 ``want`` under the
  tolerance rule; ``same`` holds the same-precision results, or is None (the cap alone).

  By default every value must be finite. With ``nonfinite_like_reference`` (inputs holding
  infinities), results may be NaN only where ``want`` is, must equal its infinities, and are
  compared where ``want`` is finite.
  """
  dtype = jnp.dtype(dtype)
  same = [None] * len(want) if same is None else same
  if not len(got) == len(want) == len(same):
    raise ValueError(f"got {len(got)} results, want {len(want)} and same {len(same)}")
  errors = {}
  for name, g, w, s in zip(names, got, want, same):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if g.shape != w.shape:
      raise AssertionError(f"{name}: shape {g.shape} != reference shape {w.shape}")
    if nonfinite_like_reference:
      assert_nonfinite_like(g, w, name)
      finite = np.isfinite(w)
      if not finite.any():
        continue
      g, w, s = g[finite], w[finite], None if s is None else np.asarray(s, np.float64)[finite]
    bound = REL_RMS_CAP[dtype] if s is None else tolerance_bound(rel_rms(s, w), dtype)
    errors[name] = (rel_rms(g, w), bound)
  return errors


def assert_gradients_within_tolerance(got, want, same, dtype, names=RESULT_NAMES, *,
                                      nonfinite_like_reference=False):
  """Checks results from :func:`gradients` (or ``(out, rem)`` alone) against
  :func:`float64_gradients` under the tolerance rule; raises naming every output that fails.
  Returns the errors of :func:`tolerance_errors` (same arguments)."""
  errors = tolerance_errors(got, want, same, dtype, names,
                            nonfinite_like_reference=nonfinite_like_reference)
  failures = [f"{name}: rel RMS error {err:.3g} > bound {bound:.3g}"
              for name, (err, bound) in errors.items() if not err <= bound]
  if failures:
    raise AssertionError(f"dtype {jnp.dtype(dtype).name}: " + "; ".join(failures))
  return errors


def skip_tolerance_bounds(q, k, v, scale, d_out, d_rem, skip_tolerance):
  """Per-element bounds ``(out, rem, dq, dk, dv, dscale)`` on how far results computed with
  ``skip_tolerance`` may be from the exact ones (causal, no segments or gates), float64 NumPy.

  A row whose walk stopped with stick ``r < skip_tolerance`` = ``tol`` left out keys whose
  fresh-stick result ``(o_far, rem_far)`` enters the exact one as ``o = o_near + r o_far``,
  ``rem = r rem_far``. With ``M_j = |do_j|_1 max|v| + |drem_j|`` and ``s_ji = sigmoid(z_ji)``:
  ``|d out| <= tol max|v|``; ``0 <= rem_got - rem <= tol``; the loss differs by
  ``r (do . o_far + drem (rem_far - 1))``, at most ``r M_j``, whose logit gradient is
  ``-s_ji r (...)`` on a walked key and at most ``r M_j (A_far_ji + s_ji)`` on a skipped one, so
  ``|d dz_ji| <= tol M_j (1 + s_ji)`` and its row sum is at most ``tol M_j (1 + sum_i s_ji)``;
  ``dq, dk, dscale`` follow through ``scale * k``, ``scale * q`` and ``q . k``, and
  ``|d dv_i| <= tol sum_j |do_j|`` (only skipped weights ``r A_far_ji <= tol`` are missing).
  """
  q, k, v, d_out, d_rem = (np.asarray(x, np.float64) for x in (q, k, v, d_out, d_rem))
  b, t, n, _ = q.shape
  group = n // k.shape[2]
  k_n, v_n = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # [B, T, N, H]
  qk = np.einsum("bjnh,binh->bnji", q, k_n)  # [B, N, T(j), T(i)]
  visible = np.tril(np.ones((t, t), bool), -1)
  s = np.where(visible, 1.0 / (1.0 + np.exp(-scale * qk)), 0.0)
  v_max, k_max, q_max = np.abs(v).max(), np.abs(k).max(), np.abs(q).max()
  m = (np.abs(d_out).sum(-1) * v_max + np.abs(d_rem)).transpose(0, 2, 1)  # [B, N, T(j)]
  row = m * (1.0 + s.sum(-1))  # [B, N, T(j)]: tol-free bound on sum_i |d dz_ji|
  tol = skip_tolerance
  dq = np.broadcast_to((tol * scale * k_max * row).transpose(0, 2, 1)[..., None], q.shape)
  per_key = np.einsum("bnj,bnji->bin", m, np.where(visible, 1.0 + s, 0.0))  # [B, T(i), N]
  dk = tol * scale * q_max * per_key.reshape(b, t, -1, group).sum(-1)[..., None]
  dk = np.broadcast_to(dk, k.shape)
  dv = tol * np.einsum("ji,bjnh->binh", visible.astype(np.float64), np.abs(d_out))
  dv = dv.reshape(b, t, -1, group, v.shape[-1]).sum(3)
  dscale = tol * np.sum(row * np.max(np.where(visible, np.abs(qk), 0.0), axis=-1))
  out = np.full(d_out.shape, tol * v_max)
  return out, np.full(d_rem.shape, tol), dq, dk, dv, np.asarray(dscale)


def median_time_ms(fn, args, iters: int) -> float:
  """Median wall time in ms of ``fn(*args)`` until its results are ready, after 3 warm-up calls."""
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)
