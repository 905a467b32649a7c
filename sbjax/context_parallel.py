"""Context parallelism: stick-breaking attention with the sequence sharded over a mesh axis.

Public API:

    chunk_attention(query, key, value, *, causal, ...)  -> (out, rem)  # one chunk pair, any device
    stick_breaking_attention(query, key, value, *, mesh=None, axis_name="context", ...)
        # the whole sequence, T sharded over the mesh's "context" axis; same contract as
        # sbjax.stick_breaking_attention

How (docs/design.md §1, chunk combine). The sequence is cut into ``2C`` equal pieces for a context
axis of size ``C``. The arrays arrive sharded contiguously (device ``d`` holds pieces ``2d`` and
``2d + 1``, the layout the rest of a model uses between layers); two ``jax.lax.ppermute`` calls
move the query pieces into the zig-zag order of ring-attention implementations, so that device
``d`` answers the queries of pieces ``d`` and ``2C - 1 - d``: ``2C - 1`` chunk pairs of work on
every device (the causal work is balanced), and the outputs go back the same way. Keys and values
(segment ids and forget gate with them) are all-gathered over the axis. Each query piece ``p``
attends to its own keys causally, then to pieces ``p - 1, ..., 0`` fully visible
(``chunk_attention(causal=False)``: a fresh stick per piece, nearest key first), combined right
to left:

    o = o_near + rem_near * o_far ,   rem = rem_near * rem_far

The farther pieces are visited in a ``lax.scan`` whose steps are ``lax.cond``s: a step is skipped
once every query of the piece has ``rem == 0`` (or ``rem < skip_tolerance``), which is exact for
``skip_tolerance=0``: what a skipped piece would add is ``rem * o_far = 0``; ``block_sizes`` with
``skip_used_stick=False`` visits every piece (the dense walk, for timing heads that attend far).
``rem`` is combined as a product of the chunks' float32 sticks (the log-space sums inside each
chunk are exact; a product that underflows is below 2^-149, where every farther weight rounds to
0 in float32 too).
Gradients are autodiff through the collectives (the transposes of ``all_gather`` and ``ppermute``
are a reduce-scatter and the reverse permutation) and the chunk op's custom VJP, which takes the
cotangent of ``rem``.

All-gather rather than a ring of ``ppermute``s for K/V: the stick is broken nearest piece first,
and under the zig-zag layout the two pieces of a device need their earlier pieces from opposite
ring directions (piece ``d`` from devices ``d - 1, d - 2, ...``, piece ``2C - 1 - d`` from
``d + 1, ...``), so a one-way ring would hand one of them its nearest pieces last and its walk
could not stop early. With every piece at hand both walks go nearest
first and stop as soon as the stick is used up, each device receives the same ``(C - 1) / C`` of
K/V as over a full ring, the gradient is one reduce-scatter (autodiff of ``all_gather``), and
XLA's asynchronous collectives may overlap the gather with the own-piece causal call. The cost is
memory: K/V of the whole sequence per device (``T x K x (H + Hv)`` elements, small next to the
activations for GQA/MQA), and no explicit compute/transfer pipelining. Measured on GPUs: pending
(no 2-GPU machine was lent; see README).

``T`` not divisible by ``2C`` is handled by padding the sequence at its end (the padded keys come
after every real query, so causality hides them; the padded queries' outputs are dropped), at
the cost of a re-layout of the inputs; a model keeps ``T`` a multiple of ``2C``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sbjax import ops
from sbjax.common import compute_dtype
from sbjax.parallel import CONTEXT, batch_and_head_axes

# The paths with a cross-chunk mode. "pallas" is the op's: on Hopper the Mosaic GPU forward, and
# the Triton kernels under differentiation.
CHUNK_IMPLEMENTATIONS = (None, "pallas", "pallas_triton", "pallas_mosaic_gpu", "scan", "xla")


def chunk_attention(query, key, value, *, causal: bool, scale=None, attend_current: bool = False,
                    segment_ids=None, key_segment_ids=None, forget_gate=None,
                    implementation=None, interpret: bool = False, block_sizes=None,
                    skip_tolerance: float = 0.0):
  """Stick-breaking attention of a query chunk over one key chunk: ``(out, rem)``.

  ``causal=True`` is ``sbjax.stick_breaking_attention(..., return_remainder=True)``. ``causal=False``
  is the fully visible cross-chunk mode: the keys are an earlier chunk of the sequence, all
  visible (``attend_current`` ignored), and each query breaks a fresh stick over them from the
  chunk's last key leftwards; ``segment_ids [B, T]`` are the queries' and ``key_segment_ids
  [B, T]`` the keys' (both or neither). Arguments otherwise as ``sbjax.stick_breaking_attention``;
  ``forget_gate [B, T, K]`` belongs to the keys. Query and key chunks have one length.

  Returns:
    ``out [B, T, N, Hv]`` in ``query.dtype``, ``rem [B, T, N]`` float32 (float64 for float64).
  """
  if implementation not in CHUNK_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {CHUNK_IMPLEMENTATIONS} (the paths with a "
                     f"cross-chunk mode), got {implementation=}.")
  ops.check_inputs(query, key, value, scale, segment_ids, implementation, interpret, block_sizes,
                   forget_gate, skip_tolerance)
  if causal and key_segment_ids is not None:
    raise ValueError("key_segment_ids applies to causal=False only (a causal call's segment_ids "
                     "serve both sides).")
  if not causal and (segment_ids is None) != (key_segment_ids is None):
    raise ValueError("segment_ids and key_segment_ids must be given together with causal=False, "
                     f"got segment_ids {'None' if segment_ids is None else 'given'} and "
                     f"key_segment_ids {'None' if key_segment_ids is None else 'given'}.")
  if key_segment_ids is not None:
    if getattr(key_segment_ids, "shape", None) != key.shape[:2] or not jnp.issubdtype(
        key_segment_ids.dtype, jnp.integer):
      raise ValueError(f"key_segment_ids must be integers of shape [B, T]={key.shape[:2]}, got "
                       f"{getattr(key_segment_ids, 'shape', type(key_segment_ids).__name__)}.")
    key_segment_ids = key_segment_ids.astype(jnp.int32)
  cross = {} if causal else dict(causal=False, key_segment_ids=key_segment_ids)
  return ops.dispatch(query, key, value, scale, segment_ids, forget_gate,
                      attend_current=attend_current, implementation=implementation,
                      interpret=interpret, block_sizes=block_sizes,
                      skip_tolerance=skip_tolerance, **cross)


def zigzag_pieces(context_size: int, device):
  """The two sequence pieces (of ``2 * context_size``) whose queries ``device`` (an int or a traced
  axis index) answers: ``(device, 2 * context_size - 1 - device)``."""
  return device, 2 * context_size - 1 - device


def _owner(piece: int, context_size: int) -> int:
  return piece if piece < context_size else 2 * context_size - 1 - piece


def _to_zigzag(x, axis_name, context_size, axis=1):
  """Local contiguous pieces ``(2d, 2d + 1)`` along ``axis`` -> ``(d, 2C - 1 - d)``: two
  ``ppermute``s (even pieces, odd pieces), each a permutation of the devices."""
  c = context_size
  first, second = jnp.split(x, 2, axis=axis)
  even = jax.lax.ppermute(first, axis_name, [(d, _owner(2 * d, c)) for d in range(c)])
  odd = jax.lax.ppermute(second, axis_name, [(d, _owner(2 * d + 1, c)) for d in range(c)])
  d_is_even = jax.lax.axis_index(axis_name) % 2 == 0  # piece d is even iff d is
  return jnp.where(d_is_even, even, odd), jnp.where(d_is_even, odd, even)  # pieces d, 2C-1-d


def _from_zigzag(lo, hi, axis_name, context_size, axis=1):
  """The inverse of ``_to_zigzag``: pieces ``(d, 2C - 1 - d)`` -> contiguous ``(2d, 2d + 1)``."""
  c = context_size
  d_is_even = jax.lax.axis_index(axis_name) % 2 == 0
  even, odd = jnp.where(d_is_even, lo, hi), jnp.where(d_is_even, hi, lo)
  first = jax.lax.ppermute(even, axis_name, [(_owner(2 * d, c), d) for d in range(c)])
  second = jax.lax.ppermute(odd, axis_name, [(_owner(2 * d + 1, c), d) for d in range(c)])
  return jnp.concatenate([first, second], axis=axis)


def _local_attention(query, key, value, segment_ids, forget_gate, scale, *, axis_name,
                     context_size, options):
  """Per device, inside ``shard_map``: contiguous local chunks ``[B, T/C, ...]`` in and out."""
  c = context_size
  piece = query.shape[1] // 2
  skip_below = options["skip_tolerance"]
  # BlockSizes(skip_used_stick=False) walks every key: the kernels' blocks and the far pieces.
  skip = getattr(options["block_sizes"], "skip_used_stick", True)
  gather = lambda x: None if x is None else jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  k_all, v_all, seg_all, gate_all = map(gather, (key, value, segment_ids, forget_gate))  # [B, T, .]
  q_lo, q_hi = _to_zigzag(query, axis_name, c)
  seg_lo, seg_hi = (None, None) if segment_ids is None else _to_zigzag(segment_ids, axis_name, c)
  take = lambda x, p: None if x is None else jax.lax.dynamic_slice_in_dim(x, p * piece, piece, 1)
  chunk = functools.partial(chunk_attention, scale=scale, **options)

  def answer(q, q_seg, p, max_far):
    """Queries of piece ``p`` (traced) against pieces ``p, p - 1, ..., p - max_far``."""
    out, rem = chunk(q, take(k_all, p), take(v_all, p), causal=True, segment_ids=q_seg,
                     forget_gate=take(gate_all, p))
    out = out.astype(rem.dtype)  # [B, P, N, Hv], accumulated in rem's float32 (float64); rem [B, P, N]

    def far(carry, far_piece):
      out, rem = carry

      def visit(out, rem):
        o_far, rem_far = chunk(
            q, take(k_all, far_piece), take(v_all, far_piece), causal=False, segment_ids=q_seg,
            key_segment_ids=take(seg_all, far_piece), forget_gate=take(gate_all, far_piece))
        return out + rem[..., None] * o_far.astype(out.dtype), rem * rem_far

      live = jnp.any(rem > skip_below) if skip else True
      return jax.lax.cond((far_piece >= 0) & live, visit, lambda o, r: (o, r), out, rem), None

    (out, rem), _ = jax.lax.scan(far, (out, rem), p - 1 - jnp.arange(max_far))
    return out.astype(query.dtype), rem

  lo, hi = zigzag_pieces(c, jax.lax.axis_index(axis_name))
  out_lo, rem_lo = answer(q_lo, seg_lo, lo, c - 1)  # piece d has at most C - 1 earlier pieces
  out_hi, rem_hi = answer(q_hi, seg_hi, hi, 2 * c - 1)
  return (_from_zigzag(out_lo, out_hi, axis_name, c), _from_zigzag(rem_lo, rem_hi, axis_name, c))


def stick_breaking_attention(query, key, value, *, mesh=None, axis_name: str = CONTEXT,
                             scale=None, attend_current: bool = False, segment_ids=None,
                             forget_gate=None, return_remainder: bool = False,
                             implementation=None, interpret: bool = False, block_sizes=None,
                             skip_tolerance: float = 0.0):
  """``sbjax.stick_breaking_attention`` with ``T`` sharded over the mesh axis ``axis_name``.

  Takes and returns global arrays (``[B, T, N, H]`` etc., as the op); batch is sharded over the
  mesh's ``"data"`` axis and heads over ``"model"`` where those are larger than 1. ``mesh``
  defaults to the one set by ``jax.set_mesh``. Without a mesh, or with ``axis_name`` of size 1,
  this is the single-device op. See the module docstring for the algorithm.

  Raises:
    ValueError: a bad argument (named), e.g. ``mesh`` without ``axis_name``.
  """
  if implementation not in CHUNK_IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {CHUNK_IMPLEMENTATIONS} (the paths with a "
                     f"cross-chunk mode), got {implementation=}.")
  ops.check_inputs(query, key, value, scale, segment_ids, implementation, interpret, block_sizes,
                   forget_gate, skip_tolerance)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  options = dict(attend_current=attend_current, implementation=implementation,
                 interpret=interpret, block_sizes=block_sizes, skip_tolerance=skip_tolerance)
  sizes = {} if mesh.empty else dict(mesh.shape)
  if not mesh.empty and axis_name not in sizes:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {tuple(sizes)}.")
  c = sizes.get(axis_name, 1)
  if c == 1:
    out, rem = chunk_attention(query, key, value, causal=True, scale=scale,
                               segment_ids=segment_ids, forget_gate=forget_gate, **options)
    return (out, rem) if return_remainder else out
  t = query.shape[1]
  data, model, key, value, forget_gate = batch_and_head_axes(mesh, query, key, value, forget_gate)
  pad = -t % (2 * c)  # pieces of equal length; padding at the end is hidden by causality
  if pad:
    widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    query, key, value = (jnp.pad(x, widths(x)) for x in (query, key, value))
    segment_ids = None if segment_ids is None else jnp.pad(segment_ids, widths(segment_ids))
    forget_gate = None if forget_gate is None else jnp.pad(forget_gate, widths(forget_gate))
  dtype = compute_dtype(query.dtype)
  scale = jnp.asarray(1.0 / math.sqrt(query.shape[-1]) if scale is None else scale, dtype)
  qkv = P(data, axis_name, model, None)
  fn = functools.partial(_local_attention, axis_name=axis_name, context_size=c, options=options)
  out, rem = jax.shard_map(
      fn, mesh=mesh,
      in_specs=(qkv, qkv, qkv, None if segment_ids is None else P(data, axis_name),
                None if forget_gate is None else P(data, axis_name, model), P()),
      out_specs=(qkv, P(data, axis_name, model)), check_vma=False,
  )(query, key, value, segment_ids, forget_gate, scale)
  if pad:
    out, rem = out[:, :t], rem[:, :t]
  return (out, rem) if return_remainder else out
