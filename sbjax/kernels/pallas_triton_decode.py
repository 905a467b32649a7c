"""Split-K decode kernel (Pallas Triton): a few new queries against a KV cache.

One program per (batch row, kv head, cache chunk), as in JAX's
``jax/experimental/pallas/ops/gpu/decode_attention.py``: the program holds the ``G * Q`` query
rows of its kv head's group (each kv head is read once for its whole group) and walks its chunk's
key blocks nearest first with a fresh stick. Chunks are counted from each row's end: chunk ``j``
of row ``b`` holds the keys ``[(last_b - j) * chunk, (last_b - j + 1) * chunk)`` below
``cache_len[b]``, where ``last_b`` is the row's last (possibly partial) chunk. The chunks'
``(o_j, log2 rem_j)`` are combined in JAX with the associative combine of docs/design.md §1:
``o = sum_j 2^(sum_{j' < j} log2 rem_j') o_j``.

Skipping (``DecodeBlockSizes.skip_used_stick``):

- within a chunk, a program stops once every row's stick is below ``2^-152`` (exact in fp32,
  ``tiles.SKIP_LOG2``): every farther weight of the chunk is exactly 0;
- across chunks, two launches: the first reads each row's ``num_near_chunks`` nearest chunks; the
  second, the farther chunks, where a program reads nothing once the first launch's stick of
  every row of its group is below ``2^-152`` (exact: the combine multiplies every farther chunk by
  ``2^(sum of the nearer log2 rem) = 0`` in fp32, so the result keeps every bit of the dense walk)
  or below ``skip_tolerance`` (the unread keys weigh less than it in all: the output moves by at
  most ``skip_tolerance * max|v|``, and ``rem`` is the stick of the keys read).
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
  num_near_chunks: with skipping, the first launch reads each row's nearest this many chunks and
    a second launch the rest, only for kv heads whose stick is not used up yet; one launch when
    the cache has no more chunks than this.
  num_blocks_per_check: key blocks walked between two tests of the in-chunk stop condition
    (Triton software-pipelines the blocks between tests).
  skip_used_stick: skip exactly within chunks and across them (module docstring); False walks
    every key below ``cache_len`` in one launch.
  """
  chunk_size: int = 512
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2
  num_near_chunks: int = 2
  num_blocks_per_check: int = 4
  skip_used_stick: bool = True

  def __post_init__(self):
    check_tiling(self)
    c = self.chunk_size
    if not isinstance(c, int) or c < self.block_k or c % self.block_k:
      raise ValueError(f"DecodeBlockSizes.chunk_size must be a positive multiple of "
                       f"block_k={self.block_k}, got {c!r}.")


def _decode_kernel(scale_ref, len_ref, prefix_ref, q_ref, k_ref, v_ref, gate_ref, out_ref, rem_ref,
                   keys_ref, *, q_len, rows, head_dim, head_dim_v, chunk, block_k, first_chunk,
                   attend_current, cumsum_parts, gpu, skip, blocks_per_check, stop):
  rows_p = q_ref.shape[0]
  length = len_ref[0]
  last = tiles.div(length + chunk - 1, chunk) - 1  # the row's nearest chunk; -1 if it is empty
  absolute = last - first_chunk - pl.program_id(2)  # this program's chunk, counted from key 0
  chunk_start = absolute * chunk
  r = jnp.arange(rows_p, dtype=jnp.int32)  # row r is query r % Q of group member r // Q
  row_ok = r < rows
  q_pos = length - q_len + jax.lax.rem(r, jnp.int32(q_len))  # [R]
  h_cols = tiles.in_range(0, q_ref.shape[-1], head_dim, partial=q_ref.shape[-1] != head_dim)
  hv_cols = tiles.in_range(0, v_ref.shape[-1], head_dim_v, partial=v_ref.shape[-1] != head_dim_v)
  r_rows = row_ok if rows != rows_p else None  # padded rows are neither read nor written
  q = tiles.load(q_ref, rows=r_rows, cols=h_cols)  # [R, H]
  scale2 = scale_ref[0] * tiles.LOG2E
  precision = tiles.dot_precision(q.dtype)
  weights = functools.partial(
      tiles.stick_weights, nearer=tiles.triangle(block_k, lambda m, i: m > i), parts=cumsum_parts,
      fast=gpu, exact=q.dtype == jnp.float32)
  live = lambda log_stick, limit: jnp.max(jnp.where(row_ok, log_stick, -jnp.inf)) > limit

  def tile(kb, carry):
    acc, log_stick = carry  # [R, Hv], [R]
    k_pos = tiles.positions(chunk_start + kb * block_k, block_k)
    keys = pl.ds(chunk_start + kb * block_k, block_k)
    k_rows = k_pos < length  # also keeps the cache's partial last block in bounds
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

  def run(hi, count, carry):  # blocks hi - 1, ..., hi - count: a fori_loop, pipelined
    return jax.lax.fori_loop(0, count, lambda t, c: tile(hi - 1 - t, c), carry)

  # Keys of this chunk below cache_len, in blocks walked right to left.
  n_keys = jnp.where(absolute >= 0, jnp.clip(length - chunk_start, 0, chunk), 0)
  if prefix_ref is not None:  # the second launch: nothing to read once the near stick is used up
    n_keys = jnp.where(live(tiles.load(prefix_ref, rows=r_rows), stop), n_keys, 0)
  n_blocks = tiles.div(n_keys + block_k - 1, block_k)
  carry = (jnp.zeros((rows_p, v_ref.shape[-1]), jnp.float32), jnp.zeros((rows_p,), jnp.float32))
  if skip:
    hi, carry = jax.lax.while_loop(
        lambda s: (s[0] >= blocks_per_check) & live(s[1][1], tiles.SKIP_LOG2),
        lambda s: (s[0] - blocks_per_check, run(s[0], blocks_per_check, s[1])),
        (n_blocks, carry))
    # Fewer than blocks_per_check blocks are left at the far end, or the stick is used up.
    rest = jnp.where((hi < blocks_per_check) & live(carry[1], tiles.SKIP_LOG2), hi, 0)
    first = hi - rest
    acc, log_stick = run(hi, rest, carry)
  else:
    first = jnp.int32(0)
    acc, log_stick = run(n_blocks, n_blocks, carry)
  tiles.store(out_ref, acc, rows=r_rows, cols=hv_cols)
  tiles.store(rem_ref, log_stick, rows=r_rows)
  keys_ref[...] = jnp.maximum(n_keys - first * block_k, 0)  # blocks [first, n_blocks) were read


def _launch(q, key_cache, value_cache, cache_len, scale, gate, prefix, *, first_chunk, num_chunks,
            rows, rows_p, q_len, block_sizes, attend_current, skip_tolerance, interpret, name):
  """One ``pallas_call`` over chunks ``[first_chunk, first_chunk + num_chunks)`` of every row.

  Returns ``(o [B, K, C, R, Hv], log2 rem [B, K, C, R], keys read [B, K, C])`` float32, float32,
  int32 (``C = num_chunks``).
  """
  b, num_kv_heads, _, h = q.shape
  s, hv = key_cache.shape[1], value_cache.shape[-1]
  hp, hvp = tiles.padded_head_dim(h), tiles.padded_head_dim(hv)
  kernel = functools.partial(
      _decode_kernel, q_len=q_len, rows=rows, head_dim=h, head_dim_v=hv,
      chunk=block_sizes.chunk_size, block_k=block_sizes.block_k, first_chunk=first_chunk,
      attend_current=attend_current, cumsum_parts=tiles.cumsum_parts(q.dtype), gpu=not interpret,
      skip=block_sizes.skip_used_stick, blocks_per_check=block_sizes.num_blocks_per_check,
      stop=tiles.stop_log2(skip_tolerance))
  return pl.pallas_call(
      kernel,
      grid=(b, num_kv_heads, num_chunks),
      in_specs=[
          pl.BlockSpec((1,), lambda bi, ki, j: (0,)),
          pl.BlockSpec((1,), lambda bi, ki, j: (bi,)),
          None if prefix is None else pl.BlockSpec((None, None, rows_p),
                                                   lambda bi, ki, j: (bi, ki, 0)),
          pl.BlockSpec((None, None, rows_p, hp), lambda bi, ki, j: (bi, ki, 0, 0)),
          # The row's whole cache for this kv head: chunk j's offset depends on cache_len[b].
          pl.BlockSpec((None, s, None, hp), lambda bi, ki, j: (bi, 0, ki, 0)),
          pl.BlockSpec((None, s, None, hvp), lambda bi, ki, j: (bi, 0, ki, 0)),
          None if gate is None else pl.BlockSpec((None, s, None), lambda bi, ki, j: (bi, 0, ki)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows_p, hvp), lambda bi, ki, j: (bi, ki, j, 0, 0)),
          pl.BlockSpec((None, None, None, rows_p), lambda bi, ki, j: (bi, ki, j, 0)),
          pl.BlockSpec((None, None, None), lambda bi, ki, j: (bi, ki, j)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, num_kv_heads, num_chunks, rows, hv), jnp.float32),
          jax.ShapeDtypeStruct((b, num_kv_heads, num_chunks, rows), jnp.float32),
          jax.ShapeDtypeStruct((b, num_kv_heads, num_chunks), jnp.int32),
      ],
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name=name,
  )(scale, cache_len, prefix, q, key_cache, value_cache, gate)


def decode(query, key_cache, value_cache, cache_len, scale, forget_gate_cache=None, *,
           attend_current: bool, block_sizes: DecodeBlockSizes | None = None,
           skip_tolerance: float = 0.0, return_keys_read: bool = False, interpret: bool = False):
  """Same contract as ``sbjax.decode.stick_breaking_decode``.

  Args:
    query: ``[B, Q, N, H]``; key_cache ``[B, S, K, H]``; value_cache ``[B, S, K, Hv]``.
    cache_len: ``[B]`` int32. scale: scalar. forget_gate_cache: ``[B, S, K]`` float32 or None.
    skip_tolerance: with ``block_sizes.skip_used_stick``, 0 for exact skipping, ``> 0`` to leave
      out the farther chunks once the nearer ones' stick is below it (module docstring).
    return_keys_read: also return ``keys_read [B, K]`` int32: the cache keys each kv head of each
      row read (inside the key blocks its programs walked, below ``cache_len``).

  Returns:
    ``(out [B, Q, N, Hv] in query.dtype, rem [B, Q, N] float32)``, then ``keys_read``.
  """
  block_sizes = block_sizes or DecodeBlockSizes()
  b, q_len, n, h = query.shape
  s, num_kv_heads, hv = key_cache.shape[1], key_cache.shape[2], value_cache.shape[-1]
  group = n // num_kv_heads
  rows = group * q_len
  rows_p = max(16, 1 << (rows - 1).bit_length())  # a power of two >= 16: Triton's dot
  num_chunks = tiles.cdiv(s, block_sizes.chunk_size)
  q = jnp.einsum("BQKGH->BKGQH", query.reshape(b, q_len, num_kv_heads, group, h))
  q = q.reshape(b, num_kv_heads, rows, h)  # [B, K, R, H]
  launch = functools.partial(
      _launch, q, key_cache, value_cache, cache_len.astype(jnp.int32),
      jnp.asarray(scale, jnp.float32).reshape(1), forget_gate_cache, rows=rows, rows_p=rows_p,
      q_len=q_len, block_sizes=block_sizes, attend_current=attend_current,
      skip_tolerance=skip_tolerance, interpret=interpret)
  near = min(block_sizes.num_near_chunks, num_chunks)
  if not block_sizes.skip_used_stick or near == num_chunks:
    parts = launch(None, first_chunk=0, num_chunks=num_chunks, name="stick_breaking_decode")
  else:
    parts = launch(None, first_chunk=0, num_chunks=near, name="stick_breaking_decode")
    # [B, K, R] log2 stick after the near chunks. Its rounding may differ from the combine's
    # cumsum below; harmless, as 2^x is 0 in fp32 from x < -150 on, 2 above the exact threshold.
    prefix = jnp.sum(parts[1], axis=2)
    far = launch(prefix, first_chunk=near, num_chunks=num_chunks - near,
                 name="stick_breaking_decode_far")
    parts = [jnp.concatenate(pair, axis=2) for pair in zip(parts, far)]
  out, log2_rem, keys_read = parts  # [B, K, C, R, Hv], [B, K, C, R], [B, K, C]
  # The combine, nearest chunk first in C: chunk j is scaled by the sticks of chunks 0..j-1.
  # Exclusive sums as the inclusive ones shifted by one chunk (no add-then-subtract).
  incl = jnp.cumsum(log2_rem, axis=2)  # [B, K, C, R]
  excl = jnp.concatenate([jnp.zeros_like(incl[:, :, :1]), incl[:, :, :-1]], axis=2)
  out = jnp.einsum("BKCR,BKCRH->BKRH", jnp.exp2(excl), out,
                   precision=jax.lax.Precision.HIGHEST)  # [B, K, R, Hv]
  out = jnp.einsum("BKGQH->BQKGH", out.reshape(b, num_kv_heads, group, q_len, hv))
  rem = jnp.einsum("BKGQ->BQKG", jnp.exp2(incl[:, :, -1]).reshape(b, num_kv_heads, group, q_len))
  result = (out.reshape(b, q_len, n, hv).astype(query.dtype), rem.reshape(b, q_len, n))
  return result + (jnp.sum(keys_read, axis=2),) if return_keys_read else result
