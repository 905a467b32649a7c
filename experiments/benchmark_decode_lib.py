r"""Logic of experiments/benchmark_decode.py (importable without its flags): shapes, logit
regimes, the timed decode steps and their table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sbjax

from benchmark_lib import TRAINED_QK, load_trained  # the trained heads, shared


IMPLEMENTATIONS = ("pallas_dense", "pallas", "pallas_tol", "xla", "softmax")
REGIMES = ("local", "far", "trained")
SKIP_TOLERANCE = 1e-3
_BLOCK = 8192  # positions of random keys/values, tiled along S
_ROW_STEP = 16  # trained regime: row b's query is the one at position 4095 - 16 b


@dataclasses.dataclass(frozen=True)
class Case:
  """One shape; ``ragged``: row b holds ``S - b S // (2B)`` keys, else every row holds S."""
  b: int
  s: int
  n: int
  k: int
  h: int
  ragged: bool = False

  def cache_len(self) -> np.ndarray:
    b = np.arange(self.b)
    return (self.s - (b * self.s) // (2 * self.b) if self.ragged else np.full(self.b, self.s)
            ).astype(np.int32)

  def kv_bytes(self, itemsize: int) -> int:
    """Bytes of the whole K and V cache."""
    return 2 * self.b * self.s * self.k * self.h * itemsize


def cases(batches, cache_lens, kv_heads, n, h, ragged=None) -> list[Case]:
  """Every (B, S, K), then the ragged ``(B, S, K)`` if given."""
  out = [Case(b, s, n, k, h) for b in batches for s in cache_lens for k in kv_heads]
  if ragged:
    out.append(Case(ragged[0], ragged[1], n, ragged[2], h, ragged=True))
  return out


def peak_hbm_bytes_per_s(device_kind: str) -> float | None:
  """The GPU's peak HBM bandwidth (datasheet), None where unknown."""
  kind = device_kind.upper()
  if "H200" in kind:
    return 4.8e12
  if "H100" in kind and ("SXM" in kind or "HBM3" in kind):  # "NVIDIA H100 80GB HBM3" is the SXM
    return 3.35e12
  return None


def device_memory_limit() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


# --- Inputs ----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=2)
def _tile(block, offsets, s):
  """``[B, S, ...]``: row b at cache position i holds ``block[(i + offsets[b]) % len(block)]``
  (one fused gather: no temporary the size of the cache)."""
  idx = (jnp.arange(s)[None, :] + offsets[:, None]) % block.shape[0]  # [B, S]
  return jnp.take(block, idx, axis=0)


def regime_inputs(regime: str, case: Case, dtype, trained=None, seed: int = 0):
  """``(query [B, 1, N, H], key_cache [B, S, K, H], value_cache [B, S, K, H], cache_len [B])`` on
  the device, for the default scale ``1/sqrt(H)`` (module docstring)."""
  b, s, n, k, h = case.b, case.s, case.n, case.k, case.h
  g = n // k
  rng = np.random.default_rng(seed)
  cache_len = case.cache_len()
  offsets = (np.arange(b) * 977) % _BLOCK
  values = jnp.asarray(rng.normal(size=(_BLOCK, k, h)), dtype)
  if regime in ("local", "far"):
    q = rng.normal(size=(b, 1, n, h))
    keys = rng.normal(size=(_BLOCK, k, h))
    if regime == "far":
      q[..., 0], keys[..., 0] = -1.0, float(jnp.asarray(5 * math.sqrt(h), dtype))
    key_cache = _tile(jnp.asarray(keys, dtype), jnp.asarray(offsets), s)
  elif regime == "trained":
    tq, tk, scale = trained if trained is not None else load_trained()
    period, pairs, half = tk.shape[0], tk.shape[1], tk.shape[2]
    if h != 2 * half:
      raise ValueError(f"the trained regime needs H=2*{half}={2 * half}, got H={h}.")
    heads = np.arange(k) % pairs  # kv head -> trained (layer, head) pair
    p = (period - 1 - _ROW_STEP * np.arange(b)) % period  # [B] each row's query position
    # Row b's key at cache position i is the trained key at (i - (cache_len - 1) + p_b) mod period.
    key_cache = _tile(jnp.asarray(np.concatenate([tk, tk], -1)[:, heads], dtype),
                      jnp.asarray((p - cache_len + 1) % period), s)
    # [B, K, 64] -> the G query heads of each kv head share its query; the scale folded in.
    q = np.concatenate([tq[p][:, heads]] * 2, -1) * (scale * math.sqrt(h) / 2)  # [B, K, H]
    q = np.repeat(q, g, axis=1)[:, None]  # [B, 1, N, H]
  else:
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}.")
  value_cache = _tile(values, jnp.asarray((offsets + 4099) % _BLOCK), s)
  return jnp.asarray(q, dtype), key_cache, value_cache, jnp.asarray(cache_len)


# --- Implementations and timing --------------------------------------------------------------

def decode_fn(impl: str, *, keys_read: bool, interpret=False, block_sizes=None,
              softmax_implementation="cudnn"):
  """``f(query, key_cache, value_cache, cache_len) -> (out, keys_read [B] or None)``."""
  if impl == "softmax":
    return lambda q, kc, vc, n: (jax.nn.dot_product_attention(
        q, kc, vc, key_value_seq_lengths=n, implementation=softmax_implementation), None)
  options = dict(implementation="xla") if impl == "xla" else dict(
      implementation="pallas", interpret=interpret, block_sizes=block_sizes)
  options["skip_tolerance"] = {"pallas_dense": None, "pallas_tol": SKIP_TOLERANCE}.get(impl, 0.0)

  def fn(q, kc, vc, n):
    res = sbjax.stick_breaking_decode(q, kc, vc, n, return_keys_read=keys_read, **options)
    return tuple(res) if keys_read else (res, None)
  return fn


def compile_fn(impl, args, *, interpret=False, block_sizes=None):
  """``(compiled, notes)``; the kernel's variants ask for ``keys_read`` and go without it where
  the op does not return it; softmax tries cuDNN, then XLA's."""
  notes = {}
  tries = [dict(keys_read=True)]
  if impl.startswith("pallas"):
    tries.append(dict(keys_read=False))
  if impl == "softmax":
    tries = [dict(keys_read=False, softmax_implementation=s) for s in ("cudnn", "xla")]
  for i, kwargs in enumerate(tries):
    try:
      fn = decode_fn(impl, interpret=interpret, block_sizes=block_sizes, **kwargs)
      compiled = jax.jit(fn).lower(*args).compile()
      jax.block_until_ready(compiled(*args))  # cuDNN may reject the call only when it runs
    except Exception as e:  # pylint: disable=broad-except
      message = f"{type(e).__name__}: {e}"[:300]
      if i + 1 == len(tries) or (impl.startswith("pallas") and "return_keys_read" not in str(e)):
        raise
      if impl == "softmax":
        notes["cudnn_error"] = message
      continue
    notes["keys_read_source"] = "op" if kwargs["keys_read"] else "cache_len"
    if impl == "softmax":
      notes["softmax_implementation"] = kwargs["softmax_implementation"]
    return compiled, notes
  raise AssertionError("unreachable")


def step_time_ms(fn, args, iters: int, min_sample_ms: float = 2.0, max_repeats: int = 100):
  """``(median ms per step, repeats)``: each of ``iters`` samples times ``repeats`` back-to-back
  calls (at least ``min_sample_ms`` in all), after 3 warm-up calls."""
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = (time.perf_counter() - start) * 1e3
  repeats = int(min(max_repeats, max(1, math.ceil(min_sample_ms / max(one, 1e-3)))))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(repeats)])
    times.append((time.perf_counter() - start) * 1e3 / repeats)
  return statistics.median(times), repeats


def _base_record(impl, regime, case, dtype):
  return dict(implementation=impl, regime=regime, B=case.b, S=case.s, N=case.n, K=case.k,
              H=case.h, dtype=jnp.dtype(dtype).name, ragged=case.ragged,
              jax=jax.__version__, gpu=jax.devices()[0].device_kind)


def run(cases_, impls=IMPLEMENTATIONS, regimes=REGIMES, dtype=jnp.bfloat16, *, iters=20,
        slow_iters=5, min_sample_ms=2.0, max_xla_cache_len=32768, max_memory_fraction=0.75,
        memory_limit=None, interpret=False, block_sizes=None, trained_path=TRAINED_QK,
        log=print) -> list[dict]:
  """Times every implementation on every case and regime; returns the records (module docstring).

  ``memory_limit``: device bytes (default: the device's ``bytes_limit``; unknown: no check).
  """
  memory_limit = memory_limit or device_memory_limit()
  peak = peak_hbm_bytes_per_s(jax.devices()[0].device_kind)
  itemsize = jnp.dtype(dtype).itemsize
  trained = load_trained(trained_path) if "trained" in regimes else None
  records = []

  def emit(rec):
    log(json.dumps(rec))
    records.append(rec)

  for case in cases_:
    cache_len = case.cache_len()
    if memory_limit and case.kv_bytes(itemsize) > max_memory_fraction * memory_limit:
      for regime in regimes:
        for impl in impls:
          emit(dict(_base_record(impl, regime, case, dtype), skipped=(
              f"K+V cache {case.kv_bytes(itemsize) / 2**30:.1f} GiB > {max_memory_fraction} of "
              f"the device's {memory_limit / 2**30:.1f} GiB")))
      continue
    compiled = {}  # impl -> (fn, notes) or the error: one compile per shape, reused by regimes
    for regime in regimes:
      args = regime_inputs(regime, case, dtype, trained)
      dense_out = None
      for impl in impls:
        rec = _base_record(impl, regime, case, dtype)
        if impl == "xla" and case.s > max_xla_cache_len:
          emit(dict(rec, skipped=f"S > max_xla_cache_len={max_xla_cache_len}"))
          continue
        if impl not in compiled:
          try:
            compiled[impl] = compile_fn(impl, args, interpret=interpret, block_sizes=block_sizes)
          except Exception as e:  # pylint: disable=broad-except
            compiled[impl] = f"{type(e).__name__}: {e}"[:300]
        if isinstance(compiled[impl], str):
          emit(dict(rec, skipped=compiled[impl]))
          continue
        fn, notes = compiled[impl]
        ms, repeats = step_time_ms(fn, args, slow_iters if impl == "xla" else iters,
                                   min_sample_ms)
        out, keys_read = fn(*args)
        keys = np.asarray(keys_read if keys_read is not None else cache_len, np.int64)
        kv_bytes = int(keys.sum()) * case.k * 2 * case.h * itemsize
        rec.update(notes, ms=ms, repeats=repeats, tokens_per_s=case.b / ms * 1e3,
                   kv_bytes_read=kv_bytes,
                   hbm_fraction=None if peak is None else kv_bytes / (ms * 1e-3) / peak,
                   keys_read_fraction=float(keys.sum() / cache_len.sum()))
        if impl == "pallas_dense":
          dense_out = np.asarray(out, np.float32)
        elif impl != "softmax" and dense_out is not None:
          rec["max_abs_diff_vs_dense"] = float(np.max(np.abs(np.asarray(out, np.float32)
                                                             - dense_out)))
        emit(rec)
      del args  # free this regime's cache before the next is built
  return records


def format_table(records) -> str:
  lines = [f"{'implementation':14} {'regime':8} {'B':>3} {'S':>7} {'K':>3} {'ms':>8} "
           f"{'tokens/s':>10} {'read':>6} {'HBM':>5}"]
  for r in records:
    head = (f"{r['implementation']:14} {r['regime']:8} {r['B']:>3} {r['S']:>7}"
            f"{'r' if r['ragged'] else ' '}{r['K']:>3}")
    if "skipped" in r:
      lines.append(f"{head} skipped: {r['skipped'][:70]}")
      continue
    hbm = "" if r["hbm_fraction"] is None else f"{r['hbm_fraction']:.0%}"
    read = f"{r['keys_read_fraction']:.0%}" + ("" if r["keys_read_source"] == "op" else "*")
    lines.append(f"{head} {r['ms']:8.4f} {r['tokens_per_s']:10.0f} {read:>6} {hbm:>5}")
  lines.append("read: the fraction of cache keys read (*: all below cache_len assumed); "
               "HBM: K+V bytes read / time / peak bandwidth; r: ragged cache_len.")
  return "\n".join(lines)
