"""``TrainConfig``: optimiser, schedule, mesh, logging and checkpoint settings of a run."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# Fields that change how a run is watched, saved or laid out on devices, not the numbers it
# computes: a checkpoint may be resumed under other values of these, and of no other field.
RESUMABLE_FIELDS = frozenset({"mesh_shape", "log_every", "eval_every", "checkpoint_every",
                              "keep_checkpoints", "async_checkpoints", "progress_bar"})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything ``sbjax.training.train`` needs besides the model and the data."""

  num_steps: int = 1000  # optimiser steps of the whole run (resumed runs count from step 0)
  learning_rate: float = 3e-4  # peak, reached after warmup
  warmup_steps: int = 100  # linear warmup from 0
  final_lr_ratio: float = 0.1  # cosine decay to learning_rate * final_lr_ratio at num_steps
  weight_decay: float = 0.1  # AdamW, on kernels and embeddings only
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables
  # (data, model) or (data, model, context), as sbjax.parallel.make_mesh takes them; data=-1 takes
  # every device left. Across processes (jax.distributed) the mesh spans all processes' devices.
  mesh_shape: tuple[int, ...] = (-1, 1)
  log_every: int = 10  # steps between metric writes (TensorBoard and progress bar)
  eval_every: int = 0  # steps between evaluations; 0 = only at the end (if eval data is given)
  checkpoint_every: int = 0  # steps between saves; 0 = no checkpoints
  keep_checkpoints: int = 3  # newest checkpoints kept
  async_checkpoints: bool = True
  progress_bar: bool = True

  def __post_init__(self):
    for name in ("num_steps", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={getattr(self, name)}.")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip_norm", "weight_decay"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={getattr(self, name)}.")
    if self.keep_checkpoints < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got keep_checkpoints={self.keep_checkpoints}.")
    if isinstance(self.mesh_shape, list):  # as read back from JSON
      object.__setattr__(self, "mesh_shape", tuple(self.mesh_shape))
    shape = self.mesh_shape
    ints = isinstance(shape, tuple) and all(type(s) is int for s in shape)
    if not (ints and len(shape) in (2, 3) and (shape[0] >= 1 or shape[0] == -1)
            and min(shape[1:]) >= 1):
      raise ValueError("mesh_shape must be (data, model) or (data, model, context), positive ints "
                       f"(data may be -1), got mesh_shape={shape!r}.")

  def replace(self, **changes) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict[str, Any]:
    """The fields as JSON values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  def resume_conflicts(self, saved: Mapping[str, Any]) -> list[str]:
    """``"name: saved -> current"`` for each field outside ``RESUMABLE_FIELDS`` where ``saved``
    (a ``to_json()`` of the config a checkpoint was made with) differs from this config."""
    current = self.to_json()
    return [f"{name}: {saved.get(name, '(unset)')!r} -> {current.get(name, '(unset)')!r}"
            for name in sorted(set(current) | set(saved))
            if name not in RESUMABLE_FIELDS and saved.get(name) != current.get(name)]
