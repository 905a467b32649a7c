"""Multi-process runs (``jax.distributed``): process-local batches to global arrays, identical
host values to sharded arrays, and which process writes logs.

In a run of P processes each process supplies only the batch rows its own devices hold. With the
meshes of ``sbjax.parallel.make_mesh`` (devices in process order, ``"data"`` the outermost axis)
process ``p`` of ``P`` holds rows ``[p * B / P, (p + 1) * B / P)`` of a global batch of ``B`` rows
when ``"data"`` spans the processes; ``process_batch_rows`` gives the rows for any mesh. One process
is the single-process case: the local rows are the whole batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sbjax.parallel import batch_sharding


def is_primary() -> bool:
  """True on the process that writes logs, TensorBoard events and the progress bar (process 0)."""
  return jax.process_index() == 0


def primary_first(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` on process 0 first, then on the others after a barrier: for work
  that fills an on-disk cache (a tokenizer, token files) that the others then only read. Every
  process must call it at the same point. One process: just ``fn``."""
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  out = fn(*args, **kwargs) if is_primary() else None
  multihost_utils.sync_global_devices(f"sbjax.primary_first:{getattr(fn, '__name__', fn)}")
  return out if is_primary() else fn(*args, **kwargs)


def _rows_sharding(sharding: NamedSharding) -> NamedSharding:
  """``sharding``'s placement of the leading (batch) axis alone, for 1-D row indices."""
  return NamedSharding(sharding.mesh, P(sharding.spec[0] if len(sharding.spec) else None))


def _row_blocks(sharding: NamedSharding) -> tuple[int, int]:
  """``(S, L)``: the batch axis is cut into ``S`` blocks over the mesh, ``L`` of them held here."""
  rows = _rows_sharding(sharding)
  spec = rows.spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  blocks = int(np.prod([sharding.mesh.shape[a] for a in axes], dtype=int))
  held = {index[0].start for index in rows.addressable_devices_indices_map((blocks,)).values()}
  return blocks, len(held)


def process_batch_rows(batch_size: int, mesh: Mesh) -> np.ndarray:
  """The rows of a global batch of ``batch_size`` rows that this process supplies, in order.

  Args:
    batch_size: the global batch size ``B`` (divisible by the mesh's ``"data"`` size).
    mesh: the run's mesh (``make_mesh(*config.mesh_shape)``).

  Returns:
    ``[B_local]`` int indices: ``batches(step)`` returns ``global_batch[rows]`` in a multi-process
    run (all of ``range(B)`` in a single-process one).
  """
  sharding = batch_sharding(mesh)
  blocks, _ = _row_blocks(sharding)
  if batch_size % blocks:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {blocks} batch shards of "
                     f"the mesh {dict(mesh.shape)}.")
  indices = _rows_sharding(sharding).addressable_devices_indices_map((batch_size,)).values()
  starts = sorted({index[0].start or 0 for index in indices})
  size = batch_size // blocks
  return np.concatenate([np.arange(start, start + size) for start in starts])


def global_batch(batch, sharding: NamedSharding) -> dict[str, jax.Array]:
  """The global ``[B, ...]`` arrays of a batch of this process's ``[B_local, ...]`` rows.

  ``B = B_local * S / L`` where the mesh cuts the batch axis into ``S`` blocks and this process's
  devices hold ``L`` of them. Axes after the first are whole on every process (each device takes its
  slice of them, e.g. of ``T`` on a context axis).
  """
  blocks, held = _row_blocks(sharding)
  out = {}
  for name, rows in batch.items():
    rows = rows if hasattr(rows, "shape") else np.asarray(rows)  # jax arrays stay on device
    if rows.ndim < 1 or rows.shape[0] % held:
      raise ValueError(f"batch[{name!r}] has shape {rows.shape}: this process holds {held} of the "
                       f"{blocks} batch shards, so its rows must be a multiple of {held}.")
    global_shape = (rows.shape[0] * blocks // held, *rows.shape[1:])
    out[name] = jax.make_array_from_process_local_data(sharding, rows, global_shape)
  return out


def place(tree, shardings):
  """``tree`` (the same values on every process, e.g. a model initialised from one seed) placed
  with ``shardings``.

  One process: ``jax.device_put``. Several: each process fills its own devices' shards from its
  copy, after checking (a sum per leaf, compared across processes) that the copies agree.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  # float32: the gather below runs in JAX's default precision.
  sums = np.asarray([np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)], np.float32)
  multihost_utils.assert_equal(sums, fail_message=(
      "The processes built different initial parameters (they must all build the model from the "
      "same seed)"))

  def put(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)
