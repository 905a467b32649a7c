"""Block sizes, warps and stages of the Pallas Triton kernels: one frozen dataclass."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def _is_power_of_two(x) -> bool:
  return isinstance(x, int) and x > 0 and x & (x - 1) == 0


def check_tiling(config) -> None:
  """Validates a kernel tiling dataclass by its field names: ``block_*`` powers of two >= 16,
  ``num_*`` positive ints, ``num_warps*`` powers of two, ``skip_used_stick`` a bool."""
  cls = type(config).__name__
  if not isinstance(config.skip_used_stick, bool):
    raise ValueError(f"{cls}.skip_used_stick must be a bool, got {config.skip_used_stick!r}.")
  for field in dataclasses.fields(config):
    name, value = field.name, getattr(config, field.name)
    if name.startswith("block_") and not (_is_power_of_two(value) and value >= 16):
      raise ValueError(f"{cls}.{name} must be a power of two >= 16, got {value!r}.")
    if name.startswith("num_") and not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{cls}.{name} must be a positive int, got {value!r}.")
    if name.startswith("num_warps") and not _is_power_of_two(value):
      raise ValueError(f"{cls}.{name} must be a power of two, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the forward and backward kernels.

  Attributes:
    block_q: query rows per forward program.
    block_k: keys per forward tile.
    num_warps: warps per forward program.
    num_stages: software-pipelining stages of the forward key loop.
    block_q_dq: query rows per program of the dq kernel.
    block_k_bwd: keys per backward tile; the dq kernel records each row's running sums at these
      key-block boundaries and the dk/dv kernel reads them, so both use this one size.
    block_q_dkv: query rows per tile of the dk/dv kernel.
    num_warps_bwd: warps per backward program.
    num_stages_bwd: pipelining stages of the backward loops.
    num_blocks_per_check: forward key blocks walked between two tests of the stop condition
      (they are software-pipelined; a test per block is not).
    num_blocks_per_check_bwd: the same for the backward walk.
    skip_used_stick: stop walking a row block's keys once every row's stick is below 2^-152 (or
      the op's ``skip_tolerance``): the farther keys' weights and gradients are then exactly 0 in
      fp32, so results are unchanged bit for bit, and long sequences cost what the rows really
      attend to. False walks every key (for timing the dense worst case). Bit-for-bit equality also needs the compiler to emit the
      same arithmetic for a tile inside the ``lax.cond`` that skips it as outside: JAX 0.11.2
      (CPU interpret mode and Triton on the GPU) does; XLA:CPU of JAX 0.10.2 does not, and there
      dk differs in the last bits (tests/test_pallas_triton.py::test_skipping_a_used_stick_is_exact).
  """

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  block_q_dq: int = 64
  block_k_bwd: int = 32
  block_q_dkv: int = 64
  num_warps_bwd: int = 4
  num_stages_bwd: int = 3
  num_blocks_per_check: int = 4
  num_blocks_per_check_bwd: int = 8
  skip_used_stick: bool = True

  def __post_init__(self):
    check_tiling(self)

  @classmethod
  def get_default(cls, head_dim: int, dtype) -> "BlockSizes":
    """Defaults for the query/key head dim ``H`` and the input dtype.

    bf16/fp16 with head dims up to 128: swept on an H200. fp32 (IEEE products on the CUDA cores)
    with head dims up to 128: chosen by registers and spills for sm_90a
    (``experiments/kernel_resources.py``): the bf16 tiles spilled 3-31 KB per thread in the fp32
    backward; these spill at most 1.6 KB (H=128) and 48 bytes (H=64). Head dims above 128 take
    small tiles to bound registers (checked only in interpret mode).
    """
    if head_dim > 128:
      return cls(block_q=64, block_k=32, num_warps=4, block_q_dq=32, block_k_bwd=32,
                 block_q_dkv=32)
    if jnp.dtype(dtype) == jnp.float32:
      return cls(block_q=32, block_k=32, num_warps=4, block_q_dq=16, block_k_bwd=32,
                 block_q_dkv=16, num_warps_bwd=8)
    return cls()
