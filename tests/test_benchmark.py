"""experiments/benchmark.py (behind experiments/benchmark.py) on the CPU: the logit regimes really are what they are named after,
and a run records every implementation (errors included) without stopping."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sbjax

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "experiments"))
import benchmark_lib as benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position


def _logits(regime, b=2, t=512, n=4, h=128):
  q, k, _, scale = benchmark.benchmark_inputs(regime, b, t, n, h, jnp.bfloat16)
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  return scale * np.einsum("bjnh,binh->bnji", q[:, -64:], k)  # the last 64 queries: [B, N, 64, T]


@pytest.mark.parametrize("regime,mean", [("local", 0.0), ("far", -5.0)])
def test_shifted_regimes(regime, mean):
  z = _logits(regime)
  assert abs(z.mean() - mean) < 0.05 and abs(z.std() - 1.0) < 0.05, (z.mean(), z.std())


def test_mixed_and_retrieval_regimes():
  z = _logits("mixed")
  np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), [0.0, 0.0, -5.0, -5.0], atol=0.05)
  z = _logits("retrieval")
  high = z > 5.0
  assert 0.007 < high.mean() < 0.013, high.mean()
  assert abs(z[high].mean() - 10.0) < 0.2 and abs(z[~high].mean() + 6.0) < 0.05


def test_trained_regime_keeps_the_saved_logits():
  """Head dim doubled and scale halved: the logits of the saved heads, tiled over heads and T."""
  saved = np.load(benchmark.TRAINED_QK)
  q0 = np.asarray(saved["query"][0, 0, :, 0], np.float64)  # layer 0, head 0: [T0, H0]
  k0 = np.asarray(saved["key"][0, 0, :, 0], np.float64)
  t0 = q0.shape[0]
  z = _logits("trained", b=1, t=t0 + 64, n=12)  # positions past T0 repeat the saved ones
  want = float(saved["scale"]) * q0[:64] @ k0.T  # queries t0 .. t0 + 63 repeat 0 .. 63
  np.testing.assert_allclose(z[0, 0, :, :t0], want, rtol=1e-2, atol=1e-2)  # bf16 inputs
  np.testing.assert_allclose(z[0, 6], z[0, 0])  # 6 saved heads, repeated over 12


def test_run_records_timings_and_errors():
  records = benchmark.run([(1, 2, 16, 64)], ["local", "far"], ["scan", "pallas"], ["fwd"],
                          jnp.float32, iters=1, slow_iters=1, log=lambda _: None)
  scan, = [r for r in records if r["implementation"] == "scan"]
  assert scan["regime"] == "any" and scan["ms"] > 0 and scan["peak_bytes"] > 0
  pallas = [r for r in records if r["implementation"] == "pallas"]
  assert [r["regime"] for r in pallas] == ["local", "far"]
  assert all("needs an NVIDIA GPU" in r["error"] for r in pallas)  # recorded, not raised
  assert "ms" in benchmark.format_table(records) and "ERROR" in benchmark.format_table(records)


def test_backward_alone_is_timed_from_held_residuals():
  """``bwd`` times the pullback alone, from residuals computed beforehand (2.5 forwards of counted
  work), and that pullback gives the gradients of a plain ``jax.vjp``; an unknown mode is
  rejected before any work."""
  records = benchmark.run([(1, 2, 16, 256)], ["local"], ["scan"], ["bwd", "fwd+bwd"], jnp.float32,
                          iters=3, slow_iters=3, log=lambda _: None)
  bwd, both = records
  assert (bwd["pass"], both["pass"]) == ("bwd", "fwd+bwd") and "error" not in bwd
  flops = 4 * 1 * 2 * 256 * 256 * 16 / 2
  assert bwd["tflops"] == pytest.approx(2.5 * flops / bwd["ms"] / 1e9)
  q, k, v, scale = benchmark.benchmark_inputs("local", 1, 256, 2, 16, jnp.float32)
  attn = benchmark.attention("scan", 16, jnp.float32)
  d_out = jnp.ones_like(v)
  got = jax.jit(lambda f, do: f(do))(benchmark._vjp_fn(attn, q, k, v, jnp.float32(scale)),
                                     d_out)
  want = jax.vjp(lambda q, k, v: attn(q, k, v, jnp.float32(scale)), q, k, v)[1](d_out)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="modes must be among"):
    benchmark.run([(1, 2, 16, 64)], ["local"], ["scan"], ["backward"], jnp.float32, iters=1)


def test_forward_and_backward_keeps_the_forward():
  """``fwd+bwd`` returns the output with the gradients, as a training step uses it: the kernels'
  residuals are their inputs, so a pass returning the gradients alone lets XLA drop the forward
  kernel (on an H100 such a "fwd+bwd" took the backward's time)."""
  q, k, v, scale = benchmark.benchmark_inputs("local", 1, 128, 2, 16, jnp.float32)
  attn = benchmark.attention("scan", 16, jnp.float32)
  d_out = jnp.ones_like(v)
  compiled, _ = benchmark.compile_pass(attn, "fwd+bwd", (q, k, v, jnp.float32(scale), d_out))
  out, grads = compiled(q, k, v, jnp.float32(scale), d_out)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(attn(q, k, v, jnp.float32(scale))))
  assert len(grads) == 3


def test_mosaic_runs_per_regime_and_both_passes():
  """The Mosaic kernels skip as the Triton kernels do (one record per regime), forward and
  forward+backward."""
  records = benchmark.run([(1, 2, 64, 64)], ["local", "far"], ["mosaic", "mosaic_tol"],
                          ["fwd", "fwd+bwd"], jnp.bfloat16, iters=1, log=lambda _: None)
  assert [(r["implementation"], r["regime"], r["pass"]) for r in records] == [
      (impl, regime, mode) for mode in ("fwd", "fwd+bwd") for impl in ("mosaic", "mosaic_tol")
      for regime in ("local", "far")]
  assert all("needs an NVIDIA Hopper GPU" in r["error"] for r in records)
  assert records[2]["skip_tolerance"] == 1e-3


def test_attention_takes_each_kernels_tiling(monkeypatch):
  """``*_dense`` turns skipping off in the kernel's own config; an unknown name is an error."""
  seen = []
  monkeypatch.setattr(sbjax, "stick_breaking_attention", lambda *a, **kw: seen.append(kw))
  for impl in ("pallas_dense", "mosaic_dense", "mosaic_tol"):
    benchmark.attention(impl, 128, jnp.bfloat16)(None, None, None, 0.1)
  assert [(kw["implementation"], type(kw["block_sizes"]).__name__,
           kw["block_sizes"].skip_used_stick, kw["skip_tolerance"]) for kw in seen] == [
      ("pallas_triton", "BlockSizes", False, 0.0),
      ("pallas_mosaic_gpu", "MosaicBlockSizes", False, 0.0),
      ("pallas_mosaic_gpu", "MosaicBlockSizes", True, 1e-3)]
  with pytest.raises(ValueError, match="impls must be among"):
    benchmark.attention("mosaic_fast", 128, jnp.bfloat16)


def test_tolerance_errors_discount_one_ulp():
  dense = np.array([1.0, -3.0, 0.5], np.float32)
  ulp = np.array([2.0**-7, 2.0**-6, 2.0**-8], np.float32)  # bf16 ulps at these magnitudes
  v = jnp.full((3,), 2.0, jnp.bfloat16)
  errors = benchmark.errors_beyond_ulp(dense + ulp, dense, v, jnp.bfloat16)
  assert errors["max_err"] == 2.0**-6 / 2.0 and errors["max_err_beyond_ulp"] == 0.0
  errors = benchmark.errors_beyond_ulp(dense + 3 * ulp, dense, v, jnp.bfloat16)
  assert errors["max_err_beyond_ulp"] == 2 * 2.0**-6 / 2.0
