"""A sharded, checkpointed training library for ``sbjax.models`` (or any nnx LM).

Public API (stable):

    TrainConfig(num_steps, learning_rate, warmup_steps, final_lr_ratio, weight_decay, b1, b2, eps,
                grad_clip_norm, mesh_shape=(-1, 1) (data, model[, context]), log_every,
                eval_every, checkpoint_every, keep_checkpoints, async_checkpoints,
                progress_bar)                                        # frozen dataclass
        .to_json() / .resume_conflicts(saved) -> ["name: saved -> current", ...]
    RESUMABLE_FIELDS   # fields a resumed run may change (mesh, intervals, progress bar)
    train(model, config, batches, workdir=None, *, eval_batches=None, mesh=None) -> TrainResult
        batches: batches(step) -> {"inputs", "targets", ["loss_mask", "segment_ids", "positions"]}
        TrainResult(state: TrainState, metrics: list[dict], eval_metrics: list[dict])
    make_optimizer(config) -> optax.GradientTransformation   # clip -> AdamW(warmup + cosine)
    learning_rate_schedule(config) -> optax.Schedule
    cross_entropy(logits, targets, loss_mask=None) -> (mean loss, {"loss_sum", "correct", "tokens"})
    init_train_state(model, tx, mesh) -> (graphdef, rest, TrainState, shardings)
    make_train_step(graphdef, rest, tx, mesh, shardings, schedule=None)
        -> train_step(state, batch) -> (state, metrics)
    make_eval_step(graphdef, rest, mesh, param_shardings) -> eval_step(params, batch) -> sums
    evaluate(eval_step, params, batches, sharding) -> {"loss", "accuracy", "tokens"}
    read_metrics_log(path, upto, *, rewrite=True) -> [entries at steps <= upto]  # drops later ones
    TrainState(step, params, opt_state)                     # NamedTuple; what checkpoints hold
    process_batch_rows(batch_size, mesh) -> [B_local] rows of a global batch this process supplies
    global_batch(batch, sharding) -> {name: jax.Array [B, ...]}  # from this process's rows
    is_primary() -> bool                                    # process 0: writes logs
    checkpoint.Checkpointer(directory, *, every, keep, async_save=True)
        .save(state, *, force=False) / .restore_latest(shardings, like) / .latest_step()
        / .close()

``train`` writes ``workdir/tensorboard`` (tensorboardX), ``workdir/metrics.jsonl``
(``METRICS_FILE``: every logged metric, across resumes), ``workdir/train_config.json`` and
``workdir/checkpoints`` (orbax: every ``checkpoint_every`` steps, newest ``keep_checkpoints``
kept, async, the last step always saved).
It resumes from the newest finished checkpoint bit-exactly, refuses checkpoints of a config that
differs outside ``RESUMABLE_FIELDS`` (a ``ValueError`` naming the fields), and on a finished
workdir trains nothing and returns the logged metrics and a fresh final evaluation. Modules may sow
``nnx.Intermediate`` values named ``"aux_loss"`` (the forget gate's sparsity loss): the train step
adds them to the loss and reports ``cross_entropy`` and ``aux_loss`` beside it.

Under ``jax.distributed`` (one process per host or GPU) every process calls ``train`` alike; each
one's ``batches`` returns its own rows of the global batch (``process_batch_rows``), all of them
save and restore checkpoints, and process 0 alone writes logs (``train``'s docstring);
``primary_first`` runs work that fills an on-disk cache on process 0 before the others read it.
"""

from sbjax.training import checkpoint
from sbjax.training.config import RESUMABLE_FIELDS, TrainConfig
from sbjax.training.distributed import (global_batch, is_primary, primary_first,
                                         process_batch_rows)
from sbjax.training.loop import METRICS_FILE, TrainResult, evaluate, read_metrics_log, train
from sbjax.training.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from sbjax.training.steps import (TrainState, cross_entropy, init_train_state, make_eval_step,
                                  make_train_step, state_shardings)

__all__ = [
    "METRICS_FILE", "RESUMABLE_FIELDS", "TrainConfig", "TrainResult", "TrainState", "checkpoint",
    "cross_entropy", "evaluate", "global_batch", "init_train_state", "is_primary",
    "learning_rate_schedule", "make_eval_step", "make_optimizer", "make_train_step",
    "primary_first", "process_batch_rows", "read_metrics_log", "state_shardings", "train",
    "weight_decay_mask",
]
