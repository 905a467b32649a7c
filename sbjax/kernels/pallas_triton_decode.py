"""Split-K decode kernel (Pallas Triton): a few new queries against a KV cache.

One program per (batch row, kv head, cache chunk), as in JAX's
``jax/experimental/pallas/ops/gpu/decode_attention.py``: the program holds the ``G * Q`` query
rows of its kv head's group (each kv head is read once for its whole group), walks its chunk's key
blocks nearest first with a fresh stick, and stops once every row's stick is used up (exact in
fp32, ``tiles.SKIP_LOG2``). Keys at and past the row's ``cache_len`` are neither read nor counted.
The chunks' ``(o_c, log2 rem_c)`` are then combined right to left in JAX with the associative
combine of docs/design.md §1: ``o = sum_c 2^(sum_{c' > c} log2 rem_c') o_c``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sbjax.kernels import pallas_triton_tiles as tiles
from sbjax.kernels.pallas_triton_config import check_tiling


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiling of the decode kernel.

  chunk_size: cache keys per program (the split-K chunk); a multiple of ``block_k``. Smaller
    chunks give more programs (parallelism at small ``B * K``), larger ones less combine work.
  block_k: keys per tile inside a chunk, a power of two >= 16.
  num_warps, num_stages: Triton's.
  skip_used_stick: stop a chunk's walk once every row's stick is below ``2^-152`` (exact).
  """
  chunk_size: int = 512
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  skip_used_stick: bool = True

  def __post_init__(self):
    check_tiling(self)
    c = self.chunk_size
    if not isinstance(c, int) or c < self.block_k or c % self.block_k:
      raise ValueError(f"DecodeBlockSizes.chunk_size must be a positive multiple of "
                       f"block_k={self.block_k}, got {c!r}.")


def _decode_kernel(scale_ref, len_ref, q_ref, k_ref, v_ref, gate_ref, out_ref, rem_ref, *, q_len,
                   rows, head_dim, head_dim_v, chunk, block_k, attend_current, cumsum_parts, gpu,
                   skip):
  rows_p = q_ref.shape[0]
  length = len_ref[0]
  chunk_start = pl.program_id(2) * chunk
  r = jnp.arange(rows_p, dtype=jnp.int32)  # row r is query r % Q of group member r // Q
  row_ok = r < rows
  q_pos = length - q_len + jax.lax.rem(r, jnp.int32(q_len))  # [R]
  h_cols = tiles.in_range(0, q_ref.shape[-1], head_dim, partial=q_ref.shape[-1] != head_dim)
  hv_cols = tiles.in_range(0, v_ref.shape[-1], head_dim_v, partial=v_ref.shape[-1] != head_dim_v)
  q = tiles.load(q_ref, rows=row_ok if rows != rows_p else None, cols=h_cols)  # [R, H]
  scale2 = scale_ref[0] * tiles.LOG2E
  precision = tiles.dot_precision(q.dtype)
  weights = functools.partial(
      tiles.stick_weights, nearer=tiles.triangle(block_k, lambda m, i: m > i), parts=cumsum_parts,
      fast=gpu, exact=q.dtype == jnp.float32)

  def tile(kb, carry):
    acc, log_stick = carry  # [R, Hv], [R]
    keys = pl.ds(kb * block_k, block_k)
    k_pos = tiles.positions(chunk_start + kb * block_k, block_k)
    k_rows = k_pos < length  # also keeps a partial last chunk of the cache in bounds
    k = tiles.load(k_ref.at[keys, :], rows=k_rows, cols=h_cols)  # [block_k, H]
    v = tiles.load(v_ref.at[keys, :], rows=k_rows, cols=hv_cols)  # [block_k, Hv]
    x = tiles.dot(q, k, trans_b=True, precision=precision) * scale2  # [R, block_k]
    mask = ((k_pos[None, :] <= q_pos[:, None] - tiles.lag(attend_current)) & k_rows[None, :]
            & row_ok[:, None])
    gate = None if gate_ref is None else tiles.key_gate(
        tiles.load(gate_ref.at[keys], rows=k_rows))
    w = weights(x, log_stick, mask=mask, gate=gate)
    acc += tiles.dot(w.a.astype(v.dtype), v, precision=precision)  # [R, Hv]
    return acc, log_stick + w.stick_sum

  # Blocks of this chunk that hold keys before cache_len; walked right to left.
  n_blocks = tiles.div(jnp.clip(length - chunk_start, 0, chunk) + block_k - 1, block_k)
  live = lambda log_stick: jnp.max(jnp.where(row_ok, log_stick, -jnp.inf))
  carry = (jnp.zeros((rows_p, v_ref.shape[-1]), jnp.float32), jnp.zeros((rows_p,), jnp.float32))
  _, (acc, log_stick) = jax.lax.while_loop(
      lambda s: (s[0] >= 0) & ((live(s[1][1]) > tiles.SKIP_LOG2) if skip else True),
      lambda s: (s[0] - 1, tile(s[0], s[1])),
      (n_blocks - 1, carry))
  out_ref[...] = acc
  rem_ref[...] = log_stick


def decode(query, key_cache, value_cache, cache_len, scale, forget_gate_cache=None, *,
           attend_current: bool, block_sizes: DecodeBlockSizes | None = None,
           interpret: bool = False):
  """Same contract as ``sbjax.decode.stick_breaking_decode`` without ``keys_read``.

  Args:
    query: ``[B, Q, N, H]``; key_cache ``[B, S, K, H]``; value_cache ``[B, S, K, Hv]``.
    cache_len: ``[B]`` int32. scale: scalar. forget_gate_cache: ``[B, S, K]`` float32 or None.

  Returns:
    ``(out [B, Q, N, Hv] in query.dtype, rem [B, Q, N] float32)``.
  """
  block_sizes = block_sizes or DecodeBlockSizes()
  b, q_len, n, h = query.shape
  s, num_kv_heads, hv = key_cache.shape[1], key_cache.shape[2], value_cache.shape[-1]
  group = n // num_kv_heads
  rows = group * q_len
  rows_p = max(16, 1 << (rows - 1).bit_length())  # a power of two >= 16: Triton's dot
  hp, hvp = tiles.padded_head_dim(h), tiles.padded_head_dim(hv)
  chunk = min(block_sizes.chunk_size, tiles.cdiv(s, block_sizes.block_k) * block_sizes.block_k)
  num_chunks = tiles.cdiv(s, chunk)
  q = jnp.einsum("BQKGH->BKGQH", query.reshape(b, q_len, num_kv_heads, group, h))
  q = q.reshape(b, num_kv_heads, rows, h)  # [B, K, R, H]
  kernel = functools.partial(
      _decode_kernel, q_len=q_len, rows=rows, head_dim=h, head_dim_v=hv, chunk=chunk,
      block_k=block_sizes.block_k, attend_current=attend_current,
      cumsum_parts=tiles.cumsum_parts(query.dtype), gpu=not interpret,
      skip=block_sizes.skip_used_stick)
  scale = jnp.asarray(scale, jnp.float32).reshape(1)
  out, log2_rem = pl.pallas_call(
      kernel,
      grid=(b, num_kv_heads, num_chunks),
      in_specs=[
          pl.BlockSpec((1,), lambda bi, ki, c: (0,)),
          pl.BlockSpec((1,), lambda bi, ki, c: (bi,)),
          pl.BlockSpec((None, None, rows_p, hp), lambda bi, ki, c: (bi, ki, 0, 0)),
          pl.BlockSpec((None, chunk, None, hp), lambda bi, ki, c: (bi, c, ki, 0)),
          pl.BlockSpec((None, chunk, None, hvp), lambda bi, ki, c: (bi, c, ki, 0)),
          None if forget_gate_cache is None else pl.BlockSpec(
              (None, chunk, None), lambda bi, ki, c: (bi, c, ki)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows_p, hvp), lambda bi, ki, c: (bi, ki, c, 0, 0)),
          pl.BlockSpec((None, None, None, rows_p), lambda bi, ki, c: (bi, ki, c, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, num_kv_heads, num_chunks, rows_p, hvp), jnp.float32),
          jax.ShapeDtypeStruct((b, num_kv_heads, num_chunks, rows_p), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="stick_breaking_decode",
  )(scale, cache_len.astype(jnp.int32), q, key_cache, value_cache, forget_gate_cache)
  out, log2_rem = out[..., :rows, :hv], log2_rem[..., :rows]  # [B, K, C, R, Hv], [B, K, C, R]
  # The combine, nearest chunk last in C: chunk c is scaled by the sticks of the chunks right of
  # it. Exclusive sums as the inclusive ones shifted by one chunk (no add-then-subtract).
  incl = jnp.flip(jnp.cumsum(jnp.flip(log2_rem, 2), axis=2), 2)  # [B, K, C, R]
  excl = jnp.concatenate([incl[:, :, 1:], jnp.zeros_like(incl[:, :, :1])], axis=2)
  out = jnp.einsum("BKCR,BKCRH->BKRH", jnp.exp2(excl), out,
                   precision=jax.lax.Precision.HIGHEST)  # [B, K, R, Hv]
  out = jnp.einsum("BKGQH->BQKGH", out.reshape(b, num_kv_heads, group, q_len, hv))
  rem = jnp.einsum("BKGQ->BQKG", jnp.exp2(incl[:, :, 0]).reshape(b, num_kv_heads, group, q_len))
  return out.reshape(b, q_len, n, hv).astype(query.dtype), rem.reshape(b, q_len, n)
