"""The optimiser: AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from sbjax.training.config import TrainConfig

# Weight decay applies to matrices (kernels, embeddings), not to norm scales or biases.
_DECAYED_SUFFIXES = ("kernel", "embedding")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """0 -> ``learning_rate`` over ``warmup_steps``, then cosine to ``learning_rate * final_lr_ratio``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.num_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * config.final_lr_ratio)


def weight_decay_mask(params):
  """True for parameters whose name ends in ``kernel`` or ``embedding``."""
  def decayed(path, _):
    # The parameter's name is the last string dict key (nnx.State paths end in `.value`).
    names = [k.key for k in path if isinstance(getattr(k, "key", None), str)]
    return bool(names) and names[-1].endswith(_DECAYED_SUFFIXES)
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Clipping (if ``grad_clip_norm``), then AdamW on the schedule."""
  adamw = optax.adamw(
      learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
      weight_decay=config.weight_decay, mask=weight_decay_mask)
  if config.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  return adamw
