"""The MQRAR sweep with every run of one model shape trained at once (``config.vmap=True``).

A *group* is one (attention, d_model, num_heads, seq_len); its *members* are the runs of the
product ``num_keys x learning_rates x seeds``. All members of a group train together: their
parameters and AdamW states are stacked on a leading member axis ``M`` and one jitted function
runs ``log_every`` steps of every member (``jax.vmap`` over members inside a ``lax.scan`` over
steps). Each member draws its batches on the device (``device_batch``: the distribution of
``sbjax.data.mqrar.make_batch``, a function of (seed, num_keys, step)), so the host only
dispatches. A member's update is ``sbjax.training``'s loss and optimiser (warmup + cosine AdamW,
clipping) with its own peak learning rate (``member_step``).

``workdir/groups/<attention>-D<d>-N<n>-T<t>-<hash>/`` holds a group's ``config.json`` (its whole
effective config; the hash covers it), ``checkpoints/`` (orbax, the stacked train state, every
``checkpoint_every`` steps: an interrupted group resumes there), ``metrics.jsonl`` (per interval:
every member's loss and accuracy) and, once finished, ``result.json`` (records, curves, recency
sums) and ``maps.npz`` (attention maps); the checkpoints of a finished group are deleted unless
``keep_final_checkpoint``. A rerun skips the finished groups. After each group the workdir's
summary, tables and plots are rewritten (``mqrar_report.write_outputs``).

Scoring: every member on the same held-out sequences of its ``num_keys`` (NumPy generator) at
the longest eval length; a shorter length's accuracy is that of the queries in its prefix (the
generator is sequential and the models causal, so a prefix is a sequence of that length). The
mechanism: attention weights (``mqrar_attention``) on held-out sequences at the trained length.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import mqrar_attention
import mqrar_lib
import mqrar_report
from sbjax import models, training
from sbjax.data import mqrar

GROUP_AXES = ("attentions", "d_model", "num_heads", "seq_len")
GROUP_FIELDS = ("attention", "d_model", "num_heads", "seq_len")
MEMBER_AXES = ("num_keys", "learning_rates", "seeds")
MEMBER_FIELDS = ("num_keys", "learning_rate", "seed")
GROUPS, GROUP_CONFIG, GROUP_RESULT, MAPS = "groups", "config.json", "result.json", "maps.npz"
# Fields that change what is shown or kept, not what a group computes: not in its identity.
_DISPLAY_FIELDS = ("progress_bar", "keep_final_checkpoint", "compile_ahead", "map_d_model",
                   "map_num_keys")
# Independent streams: training data (on the device), eval and analysis sequences (NumPy).
_TRAIN_STREAM, _EVAL_STREAM, _ANALYSIS_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Data on the device


def device_batch(key, num_keys, *, batch_size: int, seq_len: int, vocab_size: int,
                 reassign_prob: float, max_keys: int) -> dict:
  """One MQRAR batch drawn on the device, distributed as ``sbjax.data.mqrar.make_batch``.

  Args:
    key: a ``jax.random`` key.
    num_keys: keys per sequence, an int or a traced int32 scalar (so ``jax.vmap`` can give every
      member its own), in ``[1, max_keys]``.
    batch_size, seq_len, vocab_size, reassign_prob: as ``make_batch`` (checked by the caller).
    max_keys: a static bound on ``num_keys``, the width of the per-key bookkeeping.

  Returns:
    ``{"inputs", "targets" [B, T] int32, "loss_mask" [B, T] bool}``.
  """
  b, half, p_len = batch_size, vocab_size // 2, seq_len // 2
  k_keys, k_order, k_slots, k_init, k_reassign, k_shift = jax.random.split(key, 6)
  pair = jnp.arange(p_len)
  # The row's keys: the first num_keys of a random permutation of the key vocabulary.
  key_set = jnp.argsort(jax.random.uniform(k_keys, (b, half)), axis=-1)  # [B, V/2]
  # Pairs < num_keys assign the keys once in random order: sorting uniforms that are pushed past
  # 1 beyond num_keys puts a random permutation of [0, num_keys) first.
  order = jnp.argsort(jnp.where(pair < num_keys, jax.random.uniform(k_order, (b, p_len)), 2.0),
                      axis=-1)
  slots = jnp.where(pair < num_keys, order,
                    jax.random.randint(k_slots, (b, p_len), 0, num_keys))  # [B, P]
  start = jnp.take_along_axis(jax.random.randint(k_init, (b, max_keys), 0, half), slots, -1)
  reassign = jax.random.uniform(k_reassign, (b, p_len)) < reassign_prob
  # A reassigned value moves by a shift in [1, V/2) mod V/2, so it always differs; the value a
  # key holds is its first value plus the shifts of its pairs so far (a cumsum per key).
  shift = jnp.where((pair >= num_keys) & reassign,
                    jax.random.randint(k_shift, (b, p_len), 1, max(half, 2)), 0)
  per_key = jnp.cumsum((slots[..., None] == jnp.arange(max_keys)) * shift[..., None], axis=1)
  total = jnp.take_along_axis(per_key, slots[..., None], -1)[..., 0]  # [B, P]
  values = (start + total) % half
  held = (start + total - shift) % half  # before this pair: the target at a query
  query = jnp.broadcast_to(pair >= num_keys, (b, p_len))  # every later pair names a seen key
  interleave = lambda k, v: jnp.stack([k, v], -1).reshape(b, seq_len)
  return {"inputs": interleave(jnp.take_along_axis(key_set, slots, -1), values + half
                               ).astype(jnp.int32),
          "targets": interleave(jnp.where(query, held + half, 0), jnp.zeros_like(held)
                                ).astype(jnp.int32),
          "loss_mask": interleave(query, jnp.zeros_like(query))}


# ----------------------------------------------------------------------------------------------
# Groups, members, identity


def groups(config: ml_collections.ConfigDict) -> list[dict]:
  """One dict per (attention, d_model, num_heads, seq_len), keyed by ``GROUP_FIELDS``, width
  by width (every attention of a width before the next width), so that a sweep cut short holds
  whole comparisons."""
  for axis in GROUP_AXES + MEMBER_AXES:
    if not config[axis]:
      raise ValueError(f"config.{axis} must be a non-empty tuple, got {config[axis]!r}.")
  return [dict(zip(GROUP_FIELDS, (a, d, n, t))) for d, n, t, a in itertools.product(
      config.d_model, config.num_heads, config.seq_len, config.attentions)]


def members(group_cfg: dict) -> list[dict]:
  """The runs of a group, keyed by ``MEMBER_FIELDS``: num_keys outermost, seeds innermost."""
  return [dict(zip(MEMBER_FIELDS, v)) for v in itertools.product(
      *(group_cfg[a] for a in MEMBER_AXES))]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the first config field that cannot work."""
  if config.num_steps % config.log_every:
    raise ValueError(f"config.num_steps must be a multiple of config.log_every (one compiled "
                     f"chunk of steps), got num_steps={config.num_steps}, "
                     f"log_every={config.log_every}.")
  if config.checkpoint_every % config.log_every:
    raise ValueError(f"config.checkpoint_every must be a multiple of config.log_every, got "
                     f"checkpoint_every={config.checkpoint_every}, log_every={config.log_every}.")
  for lr in config.learning_rates:
    if not lr > 0:
      raise ValueError(f"config.learning_rates must be positive, got {config.learning_rates}.")
  for t in config.seq_len:
    if t not in config.eval_seq_lens:
      raise ValueError(f"config.eval_seq_lens must include the trained length {t} (the best "
                       f"learning rate is chosen there), got {config.eval_seq_lens}.")
  for t in (*config.seq_len, *config.eval_seq_lens):
    for k in config.num_keys:  # the generator's own check names the argument
      mqrar.check_args(batch_size=config.batch_size, seq_len=t, vocab_size=config.vocab_size,
                       num_keys=k, reassign_prob=config.reassign_prob)


def group_config(config: ml_collections.ConfigDict, group: dict) -> dict:
  """A group's whole effective config as JSON values: the group axes replaced by its values,
  the member axes kept as lists, the implementations resolved, display-only fields left out."""
  values = mqrar_lib.run_config(config, {**mqrar_lib.runs(config)[0], **group})
  for field, axis in zip(MEMBER_FIELDS, MEMBER_AXES):
    values.pop(field, None)
    values[axis] = list(config[axis])
  for field in _DISPLAY_FIELDS:
    values.pop(field, None)
  return values


def group_name(group_cfg: dict) -> str:
  g = group_cfg
  return f"{g['attention']}-D{g['d_model']}-N{g['num_heads']}-T{g['seq_len']}"


def group_dir_name(group_cfg: dict) -> str:
  return f"{group_name(group_cfg)}-{mqrar_lib.config_hash(group_cfg)}"


# ----------------------------------------------------------------------------------------------
# Training


def lm_config(group_cfg: dict) -> models.LMConfig:
  g = group_cfg
  return models.LMConfig(
      vocab_size=g["vocab_size"], num_layers=g["num_layers"], d_model=g["d_model"],
      num_heads=g["num_heads"], mlp_dim=g["mlp_ratio"] * g["d_model"], attention=g["attention"],
      implementation=g["implementation"], softmax_implementation=g["softmax_implementation"],
      dtype=g["dtype"])


def train_config(group_cfg: dict) -> training.TrainConfig:
  """The library's config with a peak learning rate of 1: ``member_step`` scales by its own."""
  g = group_cfg
  return training.TrainConfig(num_steps=g["num_steps"], learning_rate=1.0,
                              warmup_steps=g["warmup_steps"], weight_decay=g["weight_decay"])


def member_step(graphdef, rest, tx, params, opt_state, batch, learning_rate):
  """One optimiser step of one run -> ``(params, opt_state, sums)``.

  ``tx`` is ``sbjax.training.make_optimizer`` at peak learning rate 1 (optax's schedules take no
  traced peak); AdamW's update is linear in the learning rate, so scaling it by
  ``learning_rate`` is the run's own optimiser. ``sums`` are ``cross_entropy``'s, with ``loss``.
  """

  def loss_fn(p):
    logits = nnx.merge(graphdef, p, rest)(batch["inputs"])
    return training.cross_entropy(logits, batch["targets"], batch["loss_mask"])

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u: learning_rate * u, updates)
  return optax.apply_updates(params, updates), opt_state, {**sums, "loss": loss}


def _member_arrays(group_cfg: dict) -> dict:
  ms = members(group_cfg)
  return {"num_keys": jnp.asarray([m["num_keys"] for m in ms], jnp.int32),
          "learning_rate": jnp.asarray([m["learning_rate"] for m in ms], jnp.float32),
          "seed": jnp.asarray([m["seed"] for m in ms], jnp.int32)}


def init_state(group_cfg: dict):
  """``(graphdef, rest, TrainState)`` with every member's parameters (initialised by its seed)
  and optimiser state stacked on a leading axis ``M``."""
  ms = members(group_cfg)
  config = lm_config(group_cfg)
  by_seed = {}
  for seed in sorted({m["seed"] for m in ms}):
    graphdef, params, rest = nnx.split(models.DecoderLM(config, rngs=nnx.Rngs(seed)),
                                       nnx.Param, ...)
    by_seed[seed] = params
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *(by_seed[m["seed"]] for m in ms))
  opt_state = jax.vmap(training.make_optimizer(train_config(group_cfg)).init)(params)
  return graphdef, rest, training.TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def make_functions(group_cfg: dict, graphdef, rest):
  """The group's jitted functions (not yet compiled):

  ``chunk(state, members) -> (state, metrics)``: ``log_every`` steps of every member; metrics
  ``{"loss", "accuracy"}`` ``[M]`` are the means over those steps. ``state`` is donated.
  ``evaluate(params, batch) -> {"loss_sum", "correct", "tokens"} [M, E]``: sums over the queries
  before each eval length, for ``batch`` arrays ``[M, B, T_max]``.
  ``analyse(params, tokens [M, A, T]) -> (recency sums of [M, L, N], maps [M, L, N, W, W])``.
  """
  g = group_cfg
  tx = training.make_optimizer(train_config(g))
  max_keys = max(g["num_keys"])
  batch_args = dict(batch_size=g["batch_size"], seq_len=g["seq_len"], vocab_size=g["vocab_size"],
                    reassign_prob=g["reassign_prob"], max_keys=max_keys)

  def one(params, opt_state, num_keys, learning_rate, seed, step):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _TRAIN_STREAM), num_keys)
    batch = device_batch(jax.random.fold_in(key, step), num_keys, **batch_args)
    return member_step(graphdef, rest, tx, params, opt_state, batch, learning_rate)

  every = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None))

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(state, ms):
    def body(carry, step):
      params, opt_state = carry
      params, opt_state, sums = every(params, opt_state, ms["num_keys"], ms["learning_rate"],
                                      ms["seed"], step)
      accuracy = sums["correct"] / jnp.maximum(sums["tokens"], 1.0)
      return (params, opt_state), {"loss": sums["loss"], "accuracy": accuracy}

    steps = state.step + jnp.arange(g["log_every"])
    (params, opt_state), metrics = jax.lax.scan(body, (state.params, state.opt_state), steps)
    state = training.TrainState(state.step + g["log_every"], params, opt_state)
    return state, jax.tree.map(lambda m: m.mean(0), metrics)

  lengths = jnp.asarray(sorted(g["eval_seq_lens"]))

  def evaluate_one(args):
    params, batch = args
    logits = nnx.merge(graphdef, params, rest)(batch["inputs"])  # [B, T, V]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    correct = jnp.argmax(logits, -1) == batch["targets"]
    mask = batch["loss_mask"][None] & (jnp.arange(logits.shape[1]) < lengths[:, None])[:, None]
    total = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=(1, 2))  # [E]
    return {"loss_sum": total(losses), "correct": total(correct), "tokens": total(1.0)}

  @jax.jit
  def evaluate(params, batch):
    # One member at a time: the softmax weights of a long eval batch for every member at once
    # would not fit.
    return jax.lax.map(evaluate_one, (params, batch))

  @jax.jit
  def analyse(params, tokens):
    def analyse_one(args):
      p, t = args
      weights = mqrar_attention.attention_weights(nnx.merge(graphdef, p, rest), t)
      w = g["map_len"]
      return (mqrar_attention.recency_sums(weights, t),
              weights[:, 0, :, :w, :w].astype(jnp.float32))  # sequence 0's first w positions

    return jax.lax.map(analyse_one, (params, tokens))

  return chunk, evaluate, analyse


def _eval_data(group_cfg: dict, stream: int, seq_len: int, batch_size: int, index: int) -> dict:
  """Held-out NumPy batches ``[M, B, T]``: one per ``num_keys``, the same for every member with
  those keys (so learning rates and seeds are compared on the same sequences)."""
  g = group_cfg
  by_keys = {}
  for k in g["num_keys"]:
    b = mqrar.make_batch(np.random.default_rng((stream, k, seq_len, index)),
                         batch_size=batch_size, seq_len=seq_len, vocab_size=g["vocab_size"],
                         num_keys=k, reassign_prob=g["reassign_prob"])
    by_keys[k] = {"inputs": b.inputs, "targets": b.targets, "loss_mask": b.loss_mask}
  return {name: np.stack([by_keys[m["num_keys"]][name] for m in members(g)])
          for name in ("inputs", "targets", "loss_mask")}


def abstract_state(group_cfg: dict):
  """``(graphdef, rest, TrainState of ShapeDtypeStructs)``: the group's structure, nothing
  allocated (what compiling and restoring need)."""
  model = nnx.eval_shape(lambda: models.DecoderLM(lm_config(group_cfg), rngs=nnx.Rngs(0)))
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):  # DecoderLM keeps no other state; a model that does needs it real
    raise ValueError(f"{group_name(group_cfg)}: the model holds non-parameter state.")
  return graphdef, rest, jax.eval_shape(lambda: init_state(group_cfg)[2])


_COMPILED = {}  # group config (JSON) -> its compiled functions, for the life of the process


class _Compiled:
  """A group's compiled functions, compiled in a background thread (``pool``) or on demand.

  Only compilation runs ahead: the functions are traced and lowered here too, on abstract
  shapes, so nothing is allocated on the device before the group's turn. A process compiles a
  group once (a resumed call in the same process reuses it).
  """

  def __init__(self, group_cfg: dict, pool: concurrent.futures.Executor | None):
    self.group_cfg = group_cfg
    self.future = pool.submit(self._cached) if pool is not None else None

  def _cached(self):
    key = json.dumps(self.group_cfg, sort_keys=True)
    if key not in _COMPILED:
      _COMPILED[key] = self._compile()
    return _COMPILED[key]

  def _compile(self):
    g = self.group_cfg
    start = time.perf_counter()
    graphdef, rest, state = abstract_state(g)
    chunk, evaluate, analyse = make_functions(g, graphdef, rest)
    m = len(members(g))
    ms = jax.eval_shape(lambda: _member_arrays(g))
    batch = {n: jax.ShapeDtypeStruct((m, g["batch_size"], max(g["eval_seq_lens"])), d)
             for n, d in (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", bool))}
    tokens = jax.ShapeDtypeStruct((m, g["analysis_batch"], g["seq_len"]), jnp.int32)
    compiled = (chunk.lower(state, ms).compile(), evaluate.lower(state.params, batch).compile(),
                analyse.lower(state.params, tokens).compile())
    logging.info("%s: compiled in %.1f s.", group_name(g), time.perf_counter() - start)
    return compiled

  def get(self):
    return self.future.result() if self.future is not None else self._cached()


def train_group(group_cfg: dict, group_dir: str, compiled: _Compiled) -> dict:
  """Trains every member of a group (resuming its checkpoint), scores and analyses them.

  Returns:
    ``{"config", "records" (one per member and eval length), "curves" {"step", "loss" [S][M],
    "accuracy" [S][M]}, "recency" (one per member: sums of [L][N])}``; the attention maps of
    sequence 0 go to ``group_dir/maps.npz``.
  """
  g = group_cfg
  ms = members(g)
  chunk, evaluate, analyse = compiled.get()
  _, _, like = abstract_state(g)
  checkpointer = training.checkpoint.Checkpointer(
      os.path.join(group_dir, "checkpoints"), every=g["checkpoint_every"], keep=1)
  start = time.perf_counter()
  if checkpointer.latest_step() is not None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = checkpointer.restore_latest(jax.tree.map(lambda _: device, like), like)
    logging.warning("%s: resuming from step %d.", group_name(g), int(state.step))
  else:
    state = init_state(g)[2]
  member_arrays = _member_arrays(g)
  metrics_path = os.path.join(group_dir, "metrics.jsonl")
  entries = training.read_metrics_log(metrics_path, int(state.step))
  pending = None  # fetched one chunk late, so the host never waits for the device in between

  def write(step, metrics):
    values = jax.device_get(metrics)
    entry = {"step": step, **{k: np.round(v, 5).tolist() for k, v in values.items()}}
    entries.append(entry)
    with open(metrics_path, "a") as f:
      f.write(json.dumps(entry) + "\n")

  try:
    last_log, last_step = time.perf_counter(), int(state.step)
    warm = None  # (time, step) after this process's first chunk, which compiles
    while int(state.step) < g["num_steps"]:
      state, metrics = chunk(state, member_arrays)
      step = int(state.step)
      if warm is None:
        jax.block_until_ready(state)
        warm = time.perf_counter(), step
      if time.perf_counter() - last_log > 60:  # the pace, for planning device time
        logging.info("%s: step %d, %.3f s per step.", group_name(g), step,
                     (time.perf_counter() - last_log) / (step - last_step))
        last_log, last_step = time.perf_counter(), step
      if pending is not None:
        write(*pending)
      pending = (step, metrics)
      checkpointer.save(state, force=step == g["num_steps"])
    if pending is not None:
      write(*pending)
      jax.block_until_ready(state)
      pace = ((time.perf_counter() - warm[0]) / (pending[0] - warm[1])
              if pending[0] > warm[1] else float("nan"))
      logging.info("%s: step %d, accuracy (best member) %.3f; %.4f s per step after the first "
                   "chunk.", group_name(g), pending[0], max(entries[-1]["accuracy"]), pace)
  finally:
    checkpointer.close()
  train_seconds = time.perf_counter() - start

  # Scores: every member on its keys' held-out sequences at the longest length.
  longest = max(g["eval_seq_lens"])
  totals = None
  for i in range(g["eval_batches"]):
    sums = jax.device_get(evaluate(state.params, _eval_data(g, _EVAL_STREAM, longest,
                                                              g["batch_size"], i)))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  tokens = _eval_data(g, _ANALYSIS_STREAM, g["seq_len"], g["analysis_batch"], 0)["inputs"]
  recency, maps = jax.device_get(analyse(state.params, tokens))
  # The same at initialisation: stick-breaking favours near keys before any training, so a
  # trained model's share is read against its own starting point.
  recency_init, _ = jax.device_get(analyse(init_state(g)[2].params, tokens))

  params = models.count_params(nnx.eval_shape(
      lambda: models.DecoderLM(lm_config(g), rngs=nnx.Rngs(0))))
  last = entries[-1]
  records = []
  for i, m in enumerate(ms):
    for j, seq_len in enumerate(sorted(g["eval_seq_lens"])):
      chance, key_match = mqrar_lib.baselines(g["vocab_size"], m["num_keys"], seq_len,
                                              g["reassign_prob"])
      queries = float(totals["tokens"][i, j])
      records.append({
          **{f: g[f] for f in GROUP_FIELDS}, **m, "seq_len": seq_len,
          "train_seq_len": g["seq_len"],
          "accuracy": float(totals["correct"][i, j]) / queries,
          "eval_loss": float(totals["loss_sum"][i, j]) / queries, "queries": int(queries),
          "chance": chance, "key_match_no_recency": key_match, "num_layers": g["num_layers"],
          "vocab_size": g["vocab_size"], "reassign_prob": g["reassign_prob"],
          "num_steps": g["num_steps"], "batch_size": g["batch_size"], "params": params,
          "train_seconds": round(train_seconds, 2), "train_loss": last["loss"][i],
          "train_accuracy": last["accuracy"][i],
          "implementation": g["implementation" if g["attention"] == "stickbreaking"
                              else "softmax_implementation"],
          "backend": jax.default_backend(), "run": f"{group_dir_name(g)}/{i}",
          "config_hash": mqrar_lib.config_hash(g)})
  curves = {"step": [e["step"] for e in entries], "loss": [e["loss"] for e in entries],
            "accuracy": [e["accuracy"] for e in entries]}
  recency = [{**m, **{k: np.asarray(v[i]).tolist() for k, v in recency.items()},
              "init": {k: np.asarray(v[i]).tolist() for k, v in recency_init.items()}}
             for i, m in enumerate(ms)]
  np.savez_compressed(os.path.join(group_dir, MAPS), weights=maps,
                      tokens=tokens[:, 0, :g["map_len"]])
  return {"config": g, "records": records, "curves": curves, "recency": recency}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains every group of the config not already finished in ``workdir``; returns the records
  of every finished group. The workdir's outputs are rewritten after each group."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  planned = [group_config(config, g) for g in groups(config)]
  results = {}
  for g in planned:
    group_dir = os.path.join(workdir, GROUPS, group_dir_name(g))
    result = mqrar_lib.claim_run_dir(group_dir, g)
    if result is not None:
      results[group_dir_name(g)] = result
  todo = [g for g in planned if group_dir_name(g) not in results]
  others = sorted(set(os.listdir(os.path.join(workdir, GROUPS)))
                  - {group_dir_name(g) for g in planned})
  if others:
    logging.warning("%d groups in %s were made with other configs and are not reused: %s",
                    len(others), os.path.join(workdir, GROUPS), ", ".join(others[:3]))
  logging.info("MQRAR sweep: %d groups of %d runs, %d to train, %d already finished in %s.",
               len(planned), len(members(planned[0])), len(todo), len(planned) - len(todo),
               os.path.join(workdir, GROUPS))
  mqrar_report.write_outputs(workdir, [results[k] for k in sorted(results)], config)
  pool = (concurrent.futures.ThreadPoolExecutor(max_workers=2)
          if config.compile_ahead and len(todo) > 1 else None)
  compiled = [_Compiled(g, pool) for g in todo]
  try:
    for i, (g, c) in enumerate(zip(todo, compiled)):
      name = group_dir_name(g)
      logging.info("group %d/%d: %s (%d runs)", i + 1, len(todo), name, len(members(g)))
      group_dir = os.path.join(workdir, GROUPS, name)
      results[name] = train_group(g, group_dir, c)
      mqrar_lib.write_json(os.path.join(group_dir, GROUP_RESULT), results[name])
      if not config.keep_final_checkpoint:  # ~0.1-1 GB a group; its results are what is kept
        shutil.rmtree(os.path.join(group_dir, "checkpoints"), ignore_errors=True)
      mqrar_report.write_outputs(workdir, [results[k] for k in sorted(results)], config)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  return [r for g in planned if group_dir_name(g) in results
          for r in results[group_dir_name(g)]["records"]]
