"""Train state, loss, and the jitted, sharded train and eval steps.

Batches are dicts of ``[B, T]`` arrays: ``inputs`` and ``targets`` (int token ids), and optionally
``loss_mask`` (bool or float; 0 = not scored), ``segment_ids`` and ``positions``. The batch axis is
sharded over ``"data"``; parameters and optimiser state follow the modules' annotations
(heads, MLP units and vocabulary over ``"model"``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sbjax.parallel import batch_sharding, jit_under_mesh
from sbjax.training.distributed import place


class TrainState(NamedTuple):
  """What a checkpoint holds; enough to resume bit-exactly."""

  step: jax.Array  # int32 scalar: optimiser steps taken
  params: nnx.State  # the model's nnx.Param state
  opt_state: Any  # the optax state


def cross_entropy(logits, targets, loss_mask=None):
  """Masked next-token cross-entropy.

  Args:
    logits: ``[B, T, V]``, computed in float32.
    targets: ``[B, T]`` ints.
    loss_mask: optional ``[B, T]``; 0 drops a position.

  Returns:
    ``(mean loss over scored positions, {"loss_sum", "correct", "tokens"})``; the sums let
    evaluations over many batches weigh every token equally.
  """
  logits = logits.astype(jnp.float32)
  mask = jnp.ones(targets.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
  sums = {
      "loss_sum": jnp.sum(losses * mask),
      "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * mask),
      "tokens": jnp.sum(mask),
  }
  return sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0), sums


AUX_LOSS = "aux_loss"  # modules sow auxiliary losses under this name (nnx.Intermediate)


def _apply(graphdef, params, rest, batch):
  """``(logits, aux_loss or None)``: the sum of every ``aux_loss`` the modules sowed."""
  model = nnx.merge(graphdef, params, rest)
  logits, sown = nnx.capture(model, nnx.Intermediate)(
      batch["inputs"], batch.get("segment_ids"), batch.get("positions"))
  aux = [jnp.sum(jnp.stack(jax.tree.leaves(v))) for path, v in nnx.to_flat_state(sown)
         if AUX_LOSS in path]
  return logits, (sum(aux) if aux else None)


def state_shardings(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """``NamedSharding``s of a ``TrainState``: parameters and their optimiser moments by the
  parameters' annotations, scalars (step, counts) replicated."""
  specs = nnx.get_partition_spec(params)
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt, param_sh,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(replicated, param_sh, opt_sh)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh):
  """Splits ``model`` and places its parameters and a fresh optimiser state on ``mesh``.

  Returns:
    ``(graphdef, rest, state, shardings)``: ``graphdef`` and ``rest`` (non-parameter state, kept
    constant) rebuild the model with ``nnx.merge(graphdef, state.params, rest)``.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  shardings = state_shardings(params, tx, mesh)
  params = place(params, shardings.params)  # across processes: every process built the same model
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = place(np.zeros((), np.int32), shardings.step)
  return graphdef, rest, TrainState(step, params, opt_state), shardings


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, mesh: Mesh,
                    shardings: TrainState, schedule: optax.Schedule | None = None) -> Callable:
  """``train_step(state, batch) -> (state, metrics)``, jitted with the given shardings.

  ``state`` is donated. ``metrics`` (replicated scalars): ``loss``, ``accuracy``, ``tokens``,
  ``grad_norm``, with ``schedule`` ``learning_rate``, and, when modules sow an ``aux_loss``
  (``nnx.Intermediate``), ``cross_entropy`` and ``aux_loss`` (``loss`` is their sum).
  """

  def loss_fn(params, batch):
    logits, aux_loss = _apply(graphdef, params, rest, batch)
    loss, sums = cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
    if aux_loss is not None:  # e.g. the forget gate's sparsity loss
      return loss + aux_loss, {**sums, "cross_entropy": loss, "aux_loss": aux_loss}
    return loss, sums

  def step(state: TrainState, batch):
    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": sums["correct"] / jnp.maximum(sums["tokens"], 1.0),
               "tokens": sums["tokens"], "grad_norm": optax.tree.norm(grads)}
    metrics.update({k: sums[k] for k in ("cross_entropy", "aux_loss") if k in sums})
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return TrainState(state.step + 1, params, opt_state), metrics

  # Under the mesh: shard_attention reads it while tracing.
  return jit_under_mesh(step, mesh, in_shardings=(shardings, batch_sharding(mesh)),
                        out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


def make_eval_step(graphdef, rest, mesh: Mesh, param_shardings) -> Callable:
  """``eval_step(params, batch) -> {"loss_sum", "correct", "tokens"}`` (replicated scalars)."""

  def step(params, batch):
    logits, _ = _apply(graphdef, params, rest, batch)
    return cross_entropy(logits, batch["targets"], batch.get("loss_mask"))[1]

  return jit_under_mesh(step, mesh, in_shardings=(param_shardings, batch_sharding(mesh)),
                        out_shardings=NamedSharding(mesh, P()))
