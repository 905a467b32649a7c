"""Parameters with sharding annotations that apply only where they can: ``annotated_param``.

Every parameter records its ``PartitionSpec`` (``nnx.get_partition_spec`` reads it, and
``sbjax.training`` places parameters by it), as ``nnx.with_partitioning`` would. Flax's eager
sharding would also place it at creation, which needs a mesh: without one, building a module
raised. Here the parameter is placed at creation only when a mesh with every named axis is set
(``jax.set_mesh``) and eager sharding is on (``nnx.use_eager_sharding``, on by default), so a
module builds anywhere, as ``nnx.MultiHeadAttention`` does, and is sharded when a mesh asks for it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx


def _mesh_has_axes(names: Sequence[str | None]) -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and all(n is None or n in mesh.axis_names for n in names)


def annotated_param(init: Callable, rngs: nnx.Rngs, shape: tuple[int, ...], dtype,
                    names: tuple[str | None, ...]) -> nnx.Param:
  """``nnx.Param(init(key, shape, dtype))`` annotated with the mesh axes ``names`` (one per dim)."""
  if len(names) != len(shape):
    raise ValueError(f"names must name one mesh axis (or None) per dim, got {names=} for {shape=}.")
  eager = nnx.using_eager_sharding() and _mesh_has_axes(names)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=eager)
