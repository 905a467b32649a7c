"""experiments/benchmark_context_parallel.py on the CPU: a run on 2 simulated devices records one
device and the context axis side by side for every walk and pass, and bad arguments fail before
any work."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import benchmark_context_parallel_lib as lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_two_device_run_records_both_sides(tmp_path):
  # T=100: not a multiple of 2C=4 (padded); interpreted Triton kernels, the dense walk (the
  # default walk is the op's own), both passes. T=128 is above --single_max_len: one device
  # compiled only, two devices timed.
  out = tmp_path / "records.json"
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, "benchmark_context_parallel.py", "--seq_lens=100,128", "--regimes=far",
       "--walks=dense", "--heads=2", "--head_dim=64", "--dtype=float32", "--implementation=pallas",
       "--interpret", "--iters=1", "--single_max_len=100", f"--out={out}"],
      cwd=EXPERIMENTS, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = json.loads(out.read_text())
  assert [(r["T"], r["walk"], r["pass"], r["devices"]) for r in records] == [
      (t, "dense", mode, devices) for t in (100, 128) for mode in ("fwd", "fwd+bwd")
      for devices in (1, 2)]
  for r in records:
    assert r["peak_bytes"] > 0, r
    if r["T"] == 128 and r["devices"] == 1:
      assert r["error"].startswith("not run: T > single_max_len=100"), r
      continue
    assert "error" not in r, r
    assert r["finite"] and r["ms"] > 0, r
    if r["devices"] == 2 and r["T"] == 100:
      assert r["speedup"] > 0, r
      assert r["max_err"] < 1e-5, r  # float32: the two differ by reduction order only
  assert "speedup" in proc.stdout and "not run" in proc.stdout  # the table


@pytest.mark.parametrize("kwargs,match", [
    (dict(walks=["sparse"]), "walks must be among"),
    (dict(modes=["bwd"]), "modes must be among"),
    (dict(context=1), "context must be in"),
    (dict(context=jax.device_count() + 1), "context must be in"),
])
def test_bad_arguments_fail_before_any_work(kwargs, match):
  args = dict(seq_lens=[64], regimes=["far"], walks=["skip"], modes=["fwd"], batch=1, heads=2,
              head_dim=64, dtype=jnp.float32, context=jax.device_count(), iters=1)
  with pytest.raises(ValueError, match=match):
    lib.run(**(args | kwargs))


def test_dense_walk_needs_the_kernels():
  with pytest.raises(ValueError, match="implementation='xla'"):
    lib.attention(None, "xla", "dense")
