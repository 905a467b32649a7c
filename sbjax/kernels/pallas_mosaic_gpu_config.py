"""Tiling of the Pallas Mosaic GPU kernels: one frozen dataclass."""

from __future__ import annotations

import dataclasses

# setmaxnreg budgets of the two-consumer kernel: consumer registers -> the producer's.
PRODUCER_REGISTERS = {232: 40, 240: 24}


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
  """Tiling of the Mosaic GPU kernels (the forward's, and the backward's ring depth).

  Attributes:
    block_q: query rows per program; one warpgroup's wgmma tile has 64 rows, so a multiple of 64
      (64: one warpgroup's rows).
    block_k: keys per tile, a multiple of 64 (the 128-byte swizzle of a bf16 row of 64 keys, the
      triangular in-block sum's operand).
    num_buffers: K/V tiles in flight (TMA prefetch depth), at least 2.
    num_compute_warpgroups: 1 (one warpgroup issues its own TMA copies) or 2 (FlashAttention-3's
      structure: two consumer warpgroups of ``block_q`` rows each share the K/V tiles that a
      third, producer warpgroup loads).
    operands_in_registers: the weights ``a`` and the stick-sum parts enter their wgmma from
      registers (True) or through shared memory (False). Interpret mode always takes shared
      memory (it cannot read a register operand); the arithmetic is the same.
    pipeline_qk: FlashAttention-3's intra-warpgroup pipelining: each step issues the next key
      block's ``q k^T`` (asynchronous wgmma) before its own stick-breaking terms, so the tensor
      cores run under the softplus's exponentials and logarithms. False: each step computes
      its own ``q k^T`` and waits for it. With one warpgroup use ``num_buffers >= 3``: the
      next tile must have landed a step earlier, or the step waits for its copy.
    schedule_barrier: FlashAttention-3's ping-pong between the two consumer warpgroups (a
      barrier both meet around their wgmma issues, so one's elementwise work overlaps the
      other's matmuls); needs ``num_compute_warpgroups=2``.
    accumulate_in_place: ``a @ v`` accumulates into the output accumulator on the tensor cores
      (``pl.run_state`` with ``plgpu.ACC.init``, as FA3) instead of into a fresh one added in
      registers (one [block_q, H] fp32 tile fewer live, and no adds). Interpret mode cannot run
      ``pl.run_state`` and always adds; the GPU tests check this path.
    consumer_registers: registers per thread of each consumer warpgroup with
      ``num_compute_warpgroups=2`` (``setmaxnreg``): 232 (FA3's Pallas example; the producer
      keeps 40) or 240 (FA3's CUDA kernel; the producer keeps 24). 2 * consumers + producer
      must stay within 512 (the 64K registers of an SM over 3 x 128 threads).
    heavy_first: launch the query blocks with the longest causal walks first (the grid's query
      axis reversed), so that the last wave holds the shortest walks.
    skip_used_stick: stop walking a query block's keys once every row's stick is below 2^-152
      (or the op's ``skip_tolerance``), as the Triton kernels' option of the same name: farther
      weights are then exactly 0 in fp32 and the result is bit for bit that of the dense walk.
      With two consumers the producer warpgroup decides (it reads both consumers' sticks) and
      stops ``num_buffers + 1`` steps after both are used up. False walks every key (for timing
      the dense worst case).
    num_buffers_bwd: TMA ring slots of the backward kernels (K/V in dq, q/do/records in dk/dv).
    block_k_dq: keys per tile of the backward's dq kernel, 32 or 64: its walk fetches and records
      64-key blocks and takes each in tiles of ``block_k_dq`` keys, nearest first. 32 holds half
      the tile state live (as the Triton backward's 32-key tiles): on an H100 (T=16384, B=4,
      N=12, H=128, bf16, far logits, same run) the whole backward took 86 ms on the dense walk
      against 127 ms with 64, and 78 against 97 ms with skipping.
    block_k_dkv: keys per tile of the backward's dk/dv kernel, 32 or 64: its program still holds
      a 64-key block and multiplies 64 x 64 tiles (``A^T @ do``, ``dz^T @ q``), and takes each
      query block's logits, weights and ``G`` in two 32-key halves, nearer first for the stick,
      then left first for ``G``'s prefix (the nearer half's ``dz`` waits for the farther half's
      ``G`` row sums). On an H100 (same shapes as above, one run each) the whole backward took
      73.6 ms with 32 against 78.1 with 64 (skipping), 81.9 against 87.2 on the dense walk.
  """

  block_q: int = 64
  block_k: int = 64
  num_buffers: int = 2
  num_compute_warpgroups: int = 1
  operands_in_registers: bool = True
  pipeline_qk: bool = False
  schedule_barrier: bool = False
  accumulate_in_place: bool = False
  consumer_registers: int = 232
  heavy_first: bool = False
  skip_used_stick: bool = True
  num_buffers_bwd: int = 2
  block_k_dq: int = 32
  block_k_dkv: int = 32

  def __post_init__(self):
    cls = type(self).__name__
    if self.block_q != 64:
      raise ValueError(f"{cls}.block_q must be 64 (one warpgroup), got {self.block_q!r}.")
    if not (isinstance(self.block_k, int) and self.block_k > 0 and self.block_k % 64 == 0):
      raise ValueError(f"{cls}.block_k must be a positive multiple of 64, got {self.block_k!r}.")
    for field in ("num_buffers", "num_buffers_bwd"):
      if not (isinstance(getattr(self, field), int) and getattr(self, field) >= 2):
        raise ValueError(f"{cls}.{field} must be an int >= 2, got {getattr(self, field)!r}.")
    for flag in ("operands_in_registers", "pipeline_qk", "schedule_barrier",
                 "accumulate_in_place", "heavy_first", "skip_used_stick"):
      if not isinstance(getattr(self, flag), bool):
        raise ValueError(f"{cls}.{flag} must be a bool, got {getattr(self, flag)!r}.")
    for field in ("block_k_dq", "block_k_dkv"):
      if getattr(self, field) not in (32, 64):
        raise ValueError(f"{cls}.{field} must be 32 or 64, got {getattr(self, field)!r}.")
    if self.num_compute_warpgroups not in (1, 2):
      raise ValueError(f"{cls}.num_compute_warpgroups must be 1 or 2, got "
                       f"{self.num_compute_warpgroups!r}.")
    if self.schedule_barrier and self.num_compute_warpgroups != 2:
      raise ValueError(f"{cls}.schedule_barrier needs num_compute_warpgroups=2 (it orders two "
                       f"consumers), got {self.num_compute_warpgroups!r}.")
    if self.consumer_registers not in PRODUCER_REGISTERS:
      raise ValueError(f"{cls}.consumer_registers must be one of {tuple(PRODUCER_REGISTERS)}, "
                       f"got {self.consumer_registers!r}.")

  @classmethod
  def get_default(cls, head_dim: int, dtype) -> "MosaicBlockSizes":
    """The tuned tiling for the head dim ``H`` and input dtype (bf16/fp16, H in 64 and 128).

    Two consumer warpgroups on a 2-deep TMA ring, the next block's ``q k^T`` issued before this
    block's stick-breaking terms, ``a @ v`` accumulated in place, the longest causal walks
    launched first; no ping-pong barrier (it cost 7-10%). On an H200 (far logits, H=128, bf16;
    experiments/results/mosaic_fwd_variants_h200.json) 234-242 / 309-310 / 352 TFLOP/s at
    T = 4K / 8K / 16K in two repeats, against 178-195 / 251-281 / 317-321 with ping-pong and
    3 buffers. The same tiling serves H=64 (untimed; fewer registers).
    """
    del head_dim, dtype  # one tiling for every supported input so far
    return cls(num_compute_warpgroups=2, num_buffers=2, pipeline_qk=True,
               accumulate_in_place=True, heavy_first=True)
