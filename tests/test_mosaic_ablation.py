"""experiments/mosaic_ablation: each ablation cuts what it names from the traced kernel, and only
while it is active; bad flags fail before any work."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "experiments"))
import mosaic_ablation_lib as lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_each_ablation_cuts_what_it_names():
  sd = jax.ShapeDtypeStruct
  args = (sd((1, 256, 2, 128), jnp.bfloat16),) * 3 + (sd((), jnp.float32),)
  ops = ("exp2", "log2", "wgmma_ref")
  counts = {name: {op: lib.operation_counts(name, args)[op] for op in ops}
            for name in lib.VARIANTS}
  full = counts["full"]
  assert min(full.values()) > 0, full
  # The softplus's exp2 and log2 (in the two walk loops); the triangle's wgmma; the weights' exp2.
  assert counts["no_softplus"] == dict(full, exp2=full["exp2"] - 2, log2=0)
  assert counts["no_triangle"] == dict(full, wgmma_ref=full["wgmma_ref"] - 2)
  assert counts["no_weight_exp2"] == dict(full, exp2=full["exp2"] - 3)
  assert counts["matmuls_only"] == dict(exp2=0, log2=0, wgmma_ref=full["wgmma_ref"] - 2)
  assert {op: lib.operation_counts("full", args)[op] for op in ops} == full  # undone


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="variant must be one of"):
    with lib.ablated("no_mufu"):
      pass


@pytest.mark.parametrize("flag,message", [
    ("--shape=4:12:128", "--shape must be B:N:H:T"),
    ("--variants=full,no_mufu", "--variants must be among"),
    ("--references=flash", "--references must be among")])
def test_bad_flags_fail_before_any_work(flag, message):
  script = pathlib.Path(__file__).parent.parent / "experiments" / "mosaic_ablation.py"
  result = subprocess.run([sys.executable, str(script), flag], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-500:]
