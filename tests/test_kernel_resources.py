"""experiments/kernel_resources_lib: capturing the kernels' Triton IR and reading ptxas's report
(compiling needs a standalone Triton, which the suite does not install)."""

from __future__ import annotations

import pathlib
import sys

import jax.numpy as jnp

import sbjax

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "experiments"))
import kernel_resources_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_lower_kernels_captures_each_kernel_with_its_tiling():
  block_sizes = sbjax.BlockSizes(num_warps=8, num_stages=3, num_warps_bwd=4, num_stages_bwd=2)
  kernels = kernel_resources_lib.lower_kernels(head_dim=64, dtype=jnp.bfloat16,
                                               block_sizes=block_sizes, seq_len=128)
  by_name = {k.name: k for k in kernels}
  assert sorted(by_name) == ["stick_breaking_bwd_dkv", "stick_breaking_bwd_dq", "stick_breaking_fwd"]
  assert (by_name["stick_breaking_fwd"].num_warps, by_name["stick_breaking_fwd"].num_stages) == (8, 3)
  assert (by_name["stick_breaking_bwd_dq"].num_warps, by_name["stick_breaking_bwd_dq"].num_stages) == (4, 2)
  for k in kernels:  # Triton IR text that a standalone Triton can parse
    assert k.ttir.startswith(f"module @{k.name}") and "tt.func public" in k.ttir, k.ttir[:200]


def test_parse_ptxas_reads_registers_and_spills():
  report = ("ptxas info    : 11 bytes gmem\n"  # ptxas 12.x (Triton 3.6.0) for the dq kernel
            "ptxas info    : Compiling entry function 'stick_breaking_bwd_dq' for 'sm_90a'\n"
            "ptxas info    : Function properties for stick_breaking_bwd_dq\n"
            "    296 bytes stack frame, 844 bytes spill stores, 684 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 296 bytes cumulative stack size\n")
  assert kernel_resources_lib.parse_ptxas(report) == kernel_resources_lib.Resources(
      registers=255, spill_stores=844, spill_loads=684, stack=296)
