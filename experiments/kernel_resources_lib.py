"""Registers and spills of the Pallas Triton kernels for Hopper, found on a machine without a GPU.

The kernels are lowered for an H200 as in the lowering tests (an abstract CUDA device), their
Triton IR is captured at ``jax._src.pallas.triton`` 's lowering (a private hook of JAX 0.11.2:
this is a developer's tool, not library API), compiled for ``sm_90a`` by a standalone Triton
(3.6.0, the GPU machine's version, installed with ``pip install --target DIR triton==3.6.0``) and
read back with ``ptxas -v``: registers per thread and bytes spilled to local memory.

XLA compiles these kernels with its own bundled Triton, so the counts are indicative: they agree
with what profiles on the GPU showed (the bf16 forward at ~255 registers, the dq kernel spilling),
and they rank tilings without device time. Speed still comes from the GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import sbjax

_H200 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                     abstract_device=AbstractDevice("NVIDIA H200", None, "cuda"))


class KernelIR(NamedTuple):
  name: str  # the pallas_call's name, e.g. "stick_breaking_fwd"
  ttir: str  # Triton IR (MLIR text)
  num_warps: int
  num_stages: int


class Resources(NamedTuple):
  registers: int  # per thread
  spill_stores: int  # bytes per thread
  spill_loads: int
  stack: int  # bytes of stack frame per thread


@contextlib.contextmanager
def _capturing_triton_ir(kernels: list[KernelIR]):
  """Appends each Pallas Triton kernel lowered inside the block to ``kernels``."""
  from jax._src.pallas.triton import pallas_call_registration as registration  # private: JAX 0.11.2
  lower = registration.lowering.lower_jaxpr_to_triton_module
  custom_call = registration.mlir.custom_call
  texts = []

  def lower_and_keep(*args, **kwargs):
    result = lower(*args, **kwargs)
    texts.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  def call_and_keep(call_target_name, *args, backend_config=None, **kwargs):
    if call_target_name == "__gpu$xla.gpu.triton":
      config = backend_config
      kernels.append(KernelIR(
          name=config["name"].value, ttir=texts[-1],
          num_warps=int(config["num_warps"].value), num_stages=int(config["num_stages"].value)))
    return custom_call(call_target_name, *args, backend_config=backend_config, **kwargs)

  registration.lowering.lower_jaxpr_to_triton_module = lower_and_keep
  registration.mlir.custom_call = call_and_keep
  try:
    yield
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower
    registration.mlir.custom_call = custom_call


def lower_kernels(*, head_dim: int, dtype, block_sizes: sbjax.BlockSizes, batch: int = 1,
                  seq_len: int = 512, num_heads: int = 2) -> list[KernelIR]:
  """The forward, dq and dk/dv kernels of the op at these settings, lowered for an H200."""
  x = jax.ShapeDtypeStruct((batch, seq_len, num_heads, head_dim), jnp.dtype(dtype))

  def loss(q, k, v):
    out = sbjax.stick_breaking_attention(q, k, v, implementation="pallas", block_sizes=block_sizes)
    return jnp.sum(out.astype(jnp.float32))

  kernels: list[KernelIR] = []
  with _capturing_triton_ir(kernels), jax.sharding.use_abstract_mesh(_H200):
    for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):  # the forward alone, then the backward
      jax.jit(fn).trace(x, x, x).lower(lowering_platforms=("cuda",))
  unique = {k.name: k for k in kernels}  # the forward is lowered twice
  return list(unique.values())


_PTXAS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads.*?Used (?P<regs>\d+) registers", re.S)


def parse_ptxas(report: str) -> Resources:
  """Reads ``ptxas -v``'s report of one kernel."""
  m = _PTXAS.search(report)
  if m is None:
    raise ValueError(f"no resource line in the ptxas report: {report[:500]!r}")
  return Resources(registers=int(m["regs"]), spill_stores=int(m["stores"]),
                   spill_loads=int(m["loads"]), stack=int(m["stack"]))


def compile_for_hopper(kernel: KernelIR, triton_path: str) -> Resources:
  """Compiles ``kernel`` with the Triton at ``triton_path`` (a directory holding the ``triton``
  package) for sm_90a and returns ptxas's resource report."""
  if triton_path not in sys.path:
    sys.path.insert(0, triton_path)
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, f"{kernel.name}.ttir")
    with open(src, "w") as f:
      f.write(kernel.ttir)
    options = dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = os.path.join(tmp, "kernel.ptx")
    with open(ptx, "w") as f:
      f.write(compiled.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    command = [ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
  return parse_ptxas(proc.stderr + proc.stdout)


def report(*, head_dim: int, dtype, overrides: dict, triton_path: str,
           seq_len: int = 512) -> list[dict]:
  """One record per kernel of the ``BlockSizes`` defaults with ``overrides``."""
  block_sizes = dataclasses.replace(sbjax.BlockSizes.get_default(head_dim, dtype), **overrides)
  return [dict(kernel=k.name, head_dim=head_dim, dtype=jnp.dtype(dtype).name, variant=overrides,
               num_warps=k.num_warps, num_stages=k.num_stages,
               **compile_for_hopper(k, triton_path)._asdict())
          for k in lower_kernels(head_dim=head_dim, dtype=dtype, block_sizes=block_sizes,
                                 seq_len=seq_len)]
