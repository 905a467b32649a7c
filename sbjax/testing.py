"""Utilities for comparing stick-breaking implementations: the tolerance rule, inputs, the oracle.

Used by sbjax's own tests and GPU check, and by users who test their own implementations or models
against the float64 definition.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sbjax import reference

# The tolerance rule, stated once. An implementation's relative RMS error against the float64
# result must be at most twice that of a same-precision computation (the reference with its math in
# the input dtype) plus a noise floor, and under an absolute cap per dtype.
NOISE_FLOOR = {jnp.dtype(d): x for d, x in ((jnp.float32, 1e-5), (jnp.bfloat16, 4e-3), (jnp.float16, 1e-3))}
REL_RMS_CAP = {jnp.dtype(d): x for d, x in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2), (jnp.float16, 4e-3))}


def rel_rms(x, ref) -> float:
  """Relative RMS error ``|x - ref| / |ref|`` in float64; fails if either side is not finite."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  for name, values in (("result", x), ("reference", ref)):
    if not np.isfinite(values).all():
      raise AssertionError(f"{np.sum(~np.isfinite(values))} non-finite values in the {name}")
  return float(np.sqrt(np.mean((x - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))


def assert_within_tolerance(err: float, same_precision_err: float, dtype, what: str = ""):
  """The tolerance rule above for a relative RMS error ``err`` of an output named ``what``."""
  dtype = jnp.dtype(dtype)
  bound = min(2 * same_precision_err + NOISE_FLOOR[dtype], REL_RMS_CAP[dtype])
  if not err <= bound:
    raise AssertionError(
        f"{what}: rel RMS error {err:.3g} > bound {bound:.3g} "
        f"(same-precision error {same_precision_err:.3g}, dtype {dtype.name})")


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


def float64_result(q, k, v, seg, scale, attend_current):
  """The oracle: the dense reference in float64 on the (already rounded) inputs."""
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(np.asarray(x, np.float64))
    out, rem = reference.stick_breaking_attention(
        up(q), up(k), up(v), jnp.float64(scale), seg, attend_current=attend_current)
    return np.asarray(out), np.asarray(rem)


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
