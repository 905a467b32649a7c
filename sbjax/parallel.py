"""Meshes, shardings, and ``jax.shard_map`` around attention ops.

Public API (stable; ``sbjax.nn``, ``sbjax.models`` and ``sbjax.training`` build on it):

    DATA, MODEL, CONTEXT = "data", "model", "context"  # the mesh axis names
    make_mesh(data=-1, model=1, context=1, *, devices=None) -> jax.sharding.Mesh
    batch_sharding(mesh) -> NamedSharding            # [B, T] batches: P("data"), or
                                                      # P("data", "context") with a context axis
    context_size() -> int                            # the set mesh's "context" axis size (1: none)
    shard_sequence(x) -> x                           # [B, T, ...] constrained to ("data", "context")
    shard_attention(fn, query, key, value, segment_ids=None, forget_gate=None)  # per (batch, head) shard
    batch_and_head_axes(mesh, query, key, value, forget_gate=None)  # its axes, kv heads for them
    shard_attention_gathered(fn, query, key, value, segment_ids=None)  # + T over "context", K/V gathered
    jit_under_mesh(fn, mesh, **jit_kwargs)          # jax.jit, called under jax.set_mesh(mesh)

Parallelism is data over ``"data"`` (the batch), tensor over ``"model"`` (attention heads, MLP
hidden units, vocabulary) and context over ``"context"`` (the sequence). The axes are
``AxisType.Auto``, so the partitioner places activations from the parameter and batch shardings
(with a context axis, batches and so the activations between layers are sharded on ``T``); only
opaque ops (a ``pallas_call``) and attention across sequence shards need ``shard_map``:
stick-breaking attention over the context axis is ``sbjax.context_parallel`` (the chunk combine),
softmax attention ``shard_attention_gathered`` (keys and values all-gathered).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
MODEL = "model"
CONTEXT = "context"


def make_mesh(data: int = -1, model: int = 1, context: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``("data", "model", "context")`` mesh of Auto axes over ``devices`` (default: all of them).

  ``data=-1`` takes every device left after ``model x context``. The mesh may use a prefix of
  ``devices`` (e.g. ``data=1`` is one device), which is how sharded runs are compared with one device.
  """
  devices = list(jax.devices() if devices is None else devices)
  for name, size in (("model", model), ("context", context)):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"{name} must be a positive int, got {name}={size!r}.")
  if data == -1:
    data = len(devices) // (model * context)
  if isinstance(data, bool) or not isinstance(data, int) or data < 1:
    raise ValueError(f"data must be -1 or a positive int, got {data=}.")
  if data * model * context > len(devices):
    raise ValueError(f"mesh data={data} x model={model} x context={context} needs more than the "
                     f"{len(devices)} devices.")
  grid = np.asarray(devices[: data * model * context], dtype=object).reshape(data, model, context)
  return Mesh(grid, (DATA, MODEL, CONTEXT), axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ``"data"``; with a ``"context"`` axis larger than 1, the second
  (sequence) axis over it too, so batches are ``[B, T]`` arrays; everything else replicated."""
  if dict(mesh.shape).get(CONTEXT, 1) > 1:
    return NamedSharding(mesh, P(DATA, CONTEXT))
  return NamedSharding(mesh, P(DATA))


def context_size() -> int:
  """The size of the ``"context"`` axis of the mesh set by ``jax.set_mesh`` (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(CONTEXT, 1)


def shard_sequence(x):
  """Activations ``[B, T, ...]`` kept sharded on ``T`` over ``"context"`` (and ``B`` over
  ``"data"``) between layers, where the set mesh has a context axis larger than 1; else ``x``."""
  if context_size() == 1:
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA, CONTEXT, *([None] * (x.ndim - 2))))


def jit_under_mesh(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)``, each call made under ``jax.set_mesh(mesh)`` so that code traced
  inside (``shard_attention``) sees the mesh."""
  jitted = jax.jit(fn, **jit_kwargs)

  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  return call


def _mesh_axis(mesh, name: str, dim: int, what: str) -> str | None:
  """``name`` if the mesh has that axis with size > 1, checking that it divides ``dim``."""
  size = dict(mesh.shape).get(name, 1)
  if size == 1:
    return None
  if dim % size:
    raise ValueError(f"{what}={dim} is not divisible by the mesh axis {name!r} of size {size}.")
  return name


def batch_and_head_axes(mesh, query, key, value, forget_gate=None):
  """``(data, model, key, value, forget_gate)`` for attention sharded over ``mesh``'s batch and
  head axes: the axis names (``None`` where the axis is absent or of size 1), checked to divide
  ``B`` and ``N``, and the kv-head arrays repeated per query head where the ``"model"`` axis does
  not divide ``K`` (contiguous head shards keep query head n with kv head n // (N // K) only when
  K divides too, e.g. MQA: K = 1; otherwise every query head gets its own copy of its kv head)."""
  b, n, num_kv_heads = query.shape[0], query.shape[2], key.shape[2]
  data = _mesh_axis(mesh, DATA, b, "batch size B")
  model = _mesh_axis(mesh, MODEL, n, "query heads N")
  if model is not None and num_kv_heads % dict(mesh.shape)[MODEL]:
    group = n // num_kv_heads
    key, value = (x.repeat(group, axis=2) for x in (key, value))
    if forget_gate is not None:
      forget_gate = forget_gate.repeat(group, axis=2)
  return data, model, key, value, forget_gate


def shard_attention(fn: Callable, query, key, value, segment_ids=None, forget_gate=None):
  """``fn(query, key, value, segment_ids, forget_gate)`` run per shard of batch (``"data"``) and
  heads (``"model"``).

  Uses the mesh set by ``jax.set_mesh``; without one (or with neither axis larger than 1) ``fn`` is
  called directly. The sequence is not split: under a ``"context"`` axis larger than 1 the
  arguments are gathered on ``T`` and every context shard computes the whole attention (use
  ``sbjax.context_parallel`` or ``shard_attention_gathered`` to split the work). ``fn`` must be per-example and per-head (attention is), returning arrays whose
  leading axes are ``[B, T, N, ...]`` (``out [B, T, N, Hv]``, ``rem [B, T, N]``). Needed because
  ``pallas_call`` is opaque to the SPMD partitioner.

  Args:
    fn: the attention function.
    query: ``[B, T, N, H]``.
    key: ``[B, T, K, H]``.
    value: ``[B, T, K, Hv]``.
    segment_ids: optional ``[B, T]``.
    forget_gate: optional ``[B, T, K]``, sharded like the kv heads.
  """
  mesh = jax.sharding.get_abstract_mesh()
  args = (query, key, value, segment_ids, forget_gate)
  if mesh.empty:
    return fn(*args)
  data, model, key, value, forget_gate = batch_and_head_axes(mesh, query, key, value, forget_gate)
  if data is None and model is None:
    return fn(*args)
  qkv_spec = P(data, None, model, None)
  seg_spec = None if segment_ids is None else P(data, None)
  gate_spec = None if forget_gate is None else P(data, None, model)
  args = (query, key, value, segment_ids, forget_gate)
  out_shape = jax.eval_shape(fn, *args)
  out_specs = jax.tree.map(lambda s: P(data, None, model, *([None] * (s.ndim - 3))), out_shape)
  return jax.shard_map(
      fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, gate_spec),
      out_specs=out_specs, check_vma=False)(*args)


def shard_attention_gathered(fn: Callable, query, key, value, segment_ids=None):
  """``fn(q, k, v, q_segment_ids, k_segment_ids, q_start)`` per shard of batch (``"data"``),
  heads (``"model"``) and queries (``"context"``), with the keys and values of the whole sequence.

  For causal attention whose kernel takes an explicit mask (the softmax baselines): each context
  shard holds ``T / C`` queries starting at ``q_start`` (an int32 scalar, the global position of
  its first query) and the all-gathered ``key [B, T, K, H]``, ``value`` and key segment ids.
  Without a context axis larger than 1 ``fn`` sees the whole sequence with ``q_start = 0``. ``fn``
  returns ``[B, T/C, N, ...]``.
  """
  c = context_size()
  if c == 1:
    return shard_attention(lambda q, k, v, seg, _: fn(q, k, v, seg, seg, jnp.int32(0)),
                           query, key, value, segment_ids)
  mesh = jax.sharding.get_abstract_mesh()
  data, model, key, value, _ = batch_and_head_axes(mesh, query, key, value)
  _mesh_axis(mesh, CONTEXT, query.shape[1], "sequence length T")

  def local(q, k, v, q_seg, k_seg):
    q_start = (jax.lax.axis_index(CONTEXT) * q.shape[1]).astype(jnp.int32)
    return fn(q, k, v, q_seg, k_seg, q_start)

  seg_specs = (None, None) if segment_ids is None else (P(data, CONTEXT), P(data, None))
  out_shape = jax.eval_shape(lambda q, k, v, s: fn(q, k, v, s, s, jnp.int32(0)),
                             query, key, value, segment_ids)
  out_specs = jax.tree.map(lambda s: P(data, CONTEXT, model, *([None] * (s.ndim - 3))), out_shape)
  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(data, CONTEXT, model, None), P(data, None, model, None),
                P(data, None, model, None), *seg_specs),
      out_specs=out_specs, check_vma=False)(query, key, value, segment_ids, segment_ids)
