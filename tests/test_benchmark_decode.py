"""experiments/benchmark_decode.py on tiny shapes: the kernel interpreted, softmax through XLA."""

from __future__ import annotations

import math
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

import sbjax

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "experiments"))
import benchmark_decode_lib as bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def _logits(q, kc):
  """``[B, N, S]`` float64 logits at the default scale; query head n reads kv head n // G."""
  q, kc = np.asarray(q, np.float64)[:, 0], np.asarray(kc, np.float64)
  g = q.shape[1] // kc.shape[2]
  return np.einsum("BNH,BSNH->BNS", q, np.repeat(kc, g, axis=2)) / math.sqrt(q.shape[-1])


def test_synthetic_regimes_have_the_documented_logits():
  case = bench.Case(2, 2048, 4, 2, 128)
  for regime, shift in (("local", 0.0), ("far", -56.5 / math.sqrt(128))):
    q, kc, vc, cache_len = bench.regime_inputs(regime, case, jnp.bfloat16)
    assert kc.shape == vc.shape == (2, 2048, 2, 128) and q.shape == (2, 1, 4, 128)
    np.testing.assert_array_equal(np.asarray(cache_len), [2048, 2048])
    z = _logits(q, kc)
    assert abs(z.mean() - shift) < 0.05 and abs(z.std() - 1) < 0.05, (regime, z.mean(), z.std())


def test_trained_regime_keeps_the_trained_logits_and_order():
  """Ragged rows: the key at cache_len - 1 - j is the trained key at p_b - j (wrapping at 4096),
  and the logits are the trained scale times q . k up to the bf16 rounding of q and k."""
  tq, tk, scale = bench.load_trained()
  assert tq.shape == tk.shape == (4096, 6, 64)
  case = bench.Case(3, 4608, 12, 4, 128, ragged=True)
  q, kc, _, cache_len = bench.regime_inputs("trained", case, jnp.bfloat16, (tq, tk, scale))
  z = _logits(q, kc)  # [B, N, S]
  for b, length in enumerate(np.asarray(cache_len)):
    p = 4095 - 16 * b
    for n in range(12):
      pair = (n // 3) % 6
      # p + 1 steps back over the tile boundary where the cache is that long.
      for j in {0, 1, 700, min(p, length - 1), min(p + 1, length - 1), length - 1}:
        orig = (p - j) % 4096
        np.testing.assert_array_equal(np.asarray(kc[b, length - 1 - j, n // 3], np.float32),
                                      np.asarray(jnp.asarray(np.tile(tk[orig, pair], 2),
                                                             jnp.bfloat16), np.float32))
      orig = (p - (length - 1) + np.arange(length)) % 4096
      want = scale * np.einsum("H,SH->S", tq[p, pair].astype(np.float64), tk[orig, pair])
      bound = 2 * 2.0**-8 * scale * np.abs(tk[orig, pair]) @ np.abs(tq[p, pair]) + 1e-6
      assert (np.abs(z[b, n, :length] - want) <= bound).all()


def test_peak_bandwidth_lookup():
  assert bench.peak_hbm_bytes_per_s("NVIDIA H200") == 4.8e12
  assert bench.peak_hbm_bytes_per_s("NVIDIA H100 80GB HBM3") == 3.35e12
  assert bench.peak_hbm_bytes_per_s("NVIDIA H100 PCIe") is None
  assert bench.peak_hbm_bytes_per_s("cpu") is None


def test_run_records_every_implementation_regime_and_shape():
  cases = [bench.Case(1, 64, 4, 2, 128), bench.Case(2, 96, 4, 2, 128, ragged=True),
           bench.Case(4, 1024, 4, 2, 128)]  # the last is over the memory limit below
  lines = []
  records = bench.run(
      cases, iters=1, min_sample_ms=0.0, max_xla_cache_len=64, memory_limit=2**20,
      interpret=True, block_sizes=sbjax.DecodeBlockSizes(chunk_size=32, block_k=16),
      log=lines.append)
  assert len(records) == len(lines) == 3 * 3 * 5
  by = {(r["implementation"], r["regime"], r["S"]): r for r in records}
  for r in records:
    assert r["dtype"] == "bfloat16" and r["N"] == 4 and r["H"] == 128 and r["jax"] and r["gpu"]
    if r["S"] == 1024:
      assert "K+V cache" in r["skipped"], r
    elif r["implementation"] == "xla" and r["S"] == 96:
      assert "max_xla_cache_len" in r["skipped"], r
    elif r["implementation"] == "pallas_tol" and "skipped" in r:  # the op rejects it: says so
      assert "skip_tolerance" in r["skipped"], r
    else:
      assert "skipped" not in r, r
      cache_len = bench.Case(r["B"], r["S"], 4, 2, 128, ragged=r["ragged"]).cache_len()
      assert r["ms"] > 0 and math.isclose(r["tokens_per_s"], r["B"] / r["ms"] * 1e3)
      assert r["hbm_fraction"] is None  # no known peak bandwidth on a CPU
      all_bytes = int(cache_len.sum()) * 2 * 2 * 128 * 2
      assert 0 < r["kv_bytes_read"] <= all_bytes and 0 < r["keys_read_fraction"] <= 1
      if r["keys_read_source"] == "cache_len":
        assert r["kv_bytes_read"] == all_bytes and r["keys_read_fraction"] == 1.0
  for regime in bench.REGIMES:
    for s in (64, 96):
      assert by["pallas", regime, s]["max_abs_diff_vs_dense"] == 0.0  # exact skipping
      assert by["softmax", regime, s]["softmax_implementation"] == "xla"
      assert "cudnn_error" in by["softmax", regime, s]
      tol = by["pallas_tol", regime, s]
      if "skipped" not in tol:  # the unread part weighs < 1e-3 (values ~ N(0, 1), |v| < 6)
        assert tol["max_abs_diff_vs_dense"] <= 6e-3, tol
    assert by["xla", regime, 64]["keys_read_source"] == "op"
    assert by["xla", regime, 64]["max_abs_diff_vs_dense"] < 0.02  # bf16 rounding apart
  table = bench.format_table(records)
  assert "skipped: K+V cache" in table and len(table.splitlines()) == len(records) + 2
