"""A sharded, checkpointed training library for ``sbjax.models`` (or any nnx LM).

Public API (stable):

    TrainConfig(num_steps, learning_rate, warmup_steps, final_lr_ratio, weight_decay, b1, b2, eps,
                grad_clip_norm, mesh_shape=(-1, 1), log_every, eval_every, checkpoint_every,
                keep_checkpoints, async_checkpoints, progress_bar)       # frozen dataclass
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
    read_metrics_log(path, upto) -> [entries at steps <= upto]   # and drops later ones from the file
    TrainState(step, params, opt_state)                     # NamedTuple; what checkpoints hold
    checkpoint.Checkpointer(directory, *, every, keep, async_save=True)
        .save(state, *, force=False) / .restore_latest(shardings, like) / .latest_step()
        / .close()

``train`` writes ``workdir/tensorboard`` (tensorboardX), ``workdir/metrics.jsonl`` (every logged
metric, across resumes), ``workdir/train_config.json`` and ``workdir/checkpoints`` (orbax: every
``checkpoint_every`` steps, newest ``keep_checkpoints`` kept, async, the last step always saved).
It resumes from the newest finished checkpoint bit-exactly, refuses checkpoints of a config that
differs outside ``RESUMABLE_FIELDS`` (a ``ValueError`` naming the fields), and on a finished
workdir trains nothing and returns the logged metrics and a fresh final evaluation. Modules may sow
``nnx.Intermediate`` values named ``"aux_loss"`` (the forget gate's sparsity loss): the train step
adds them to the loss and reports ``cross_entropy`` and ``aux_loss`` beside it.
"""

from sbjax.training import checkpoint
from sbjax.training.config import RESUMABLE_FIELDS, TrainConfig
from sbjax.training.loop import TrainResult, evaluate, read_metrics_log, train
from sbjax.training.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from sbjax.training.steps import (TrainState, cross_entropy, init_train_state, make_eval_step,
                                  make_train_step, state_shardings)

__all__ = [
    "RESUMABLE_FIELDS", "TrainConfig", "TrainResult", "TrainState", "checkpoint", "cross_entropy",
    "evaluate", "init_train_state", "learning_rate_schedule", "make_eval_step", "make_optimizer",
    "make_train_step", "read_metrics_log", "state_shardings", "train", "weight_decay_mask",
]
