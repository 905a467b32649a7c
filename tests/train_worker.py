"""Subprocess entry point of tests/test_training.py (a fresh process per run).

    python tests/train_worker.py shard OUT.json     # needs 8 host devices (XLA_FLAGS)
    python tests/train_worker.py train WORKDIR OUT.npz [KILL_AT_STEP [AFTER_CHECKPOINT]]
    python tests/train_worker.py dist WORKDIR OUT.npz NUM_PROCESSES PROCESS_ID PORT \
        [KILL_AT_STEP AFTER_CHECKPOINT]

A run with KILL_AT_STEP SIGKILLs itself when it asks for that step's batch, once the checkpoint
of step AFTER_CHECKPOINT (if given) is fully written. ``dist`` is one process of a
``jax.distributed`` run on localhost:PORT (no ``jax.distributed`` when NUM_PROCESSES is 1) that
trains a one-layer model on a (2, D/2, 1) mesh of all D devices, each process supplying its rows
of the batch; its processes kill themselves together, and process 0 writes the final state, its
rows and the logged losses to OUT.npz (the others their rows and losses to OUT.npz.<process>.json).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sbjax import parallel, training  # noqa: E402
from sbjax.models import DecoderLM, lm_config  # noqa: E402
from sbjax.testing import rel_rms  # noqa: E402

CONFIG = lm_config("tiny", implementation="xla", num_kv_heads=2, remainder="current",
                   head_norm=True)


def _model():
  return DecoderLM(CONFIG, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def batch(step: int, b: int = 8, t: int = 16):
  """The batch of ``step``: a function of the step alone, so resumed runs see the same data."""
  rng = np.random.default_rng(step)
  tokens = rng.integers(0, CONFIG.vocab_size, size=(b, t + 1)).astype(np.int32)
  mask = (rng.random((b, t)) < 0.8).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def shard(out_path: str):
  """Gradients and two train steps on a 4x2 mesh and on one device; writes the differences."""
  tx = training.make_optimizer(training.TrainConfig(num_steps=10, warmup_steps=0, learning_rate=1e-2))
  results = {}
  for name, (data, model) in {"one": (1, 1), "mesh": (4, 2)}.items():
    mesh = parallel.make_mesh(data, model)
    graphdef, rest, state, shardings = training.init_train_state(_model(), tx, mesh)

    def loss_fn(params, batch):
      logits = nnx.merge(graphdef, params, rest)(batch["inputs"])
      return training.cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]

    with jax.set_mesh(mesh):
      grads = jax.jit(jax.grad(loss_fn))(
          state.params, jax.device_put(batch(0), parallel.batch_sharding(mesh)))
    step = training.make_train_step(graphdef, rest, tx, mesh, shardings)
    losses = []
    for i in range(2):
      state, metrics = step(state, jax.device_put(batch(i), parallel.batch_sharding(mesh)))
      losses.append(float(metrics["loss"]))
    kernel = state.params["blocks"][0]["attention"]["query_kernel"][...]
    results[name] = dict(losses=losses, params=jax.device_get(jax.tree.leaves(state.params)),
                         grads=jax.device_get(jax.tree.leaves(grads)),
                         spec=str(kernel.sharding.spec), shards=len(kernel.addressable_shards))
  finite = all(np.isfinite(x).all() for r in results.values() for x in r["params"] + r["grads"])
  errors = {f"{what}_rel_rms": rel_rms(results["mesh"][what], results["one"][what]) if finite
            else None for what in ("grads", "params")}  # over all leaves together
  # A batch the 4 "data" shards cannot split evenly is refused, naming what is wrong.
  mesh, rejected = parallel.make_mesh(4, 2), []
  for call in (lambda: training.process_batch_rows(6, mesh),
               lambda: training.global_batch(batch(0, b=6), parallel.batch_sharding(mesh))):
    try:
      call()
      rejected.append(None)
    except ValueError as e:
      rejected.append(str(e))
  # With a context axis batches are [B, T] over ("data", "context"); each process still gives
  # whole rows.
  mesh_c = parallel.make_mesh(2, 1, 4)
  sharded = training.global_batch(batch(0), parallel.batch_sharding(mesh_c))["inputs"]
  context = dict(rows=training.process_batch_rows(8, mesh_c).tolist(),
                 spec=str(sharded.sharding.spec),
                 shard=list(sharded.addressable_shards[0].data.shape),
                 equal=bool(np.array_equal(np.asarray(sharded), batch(0)["inputs"])))
  with open(out_path, "w") as f:
    json.dump(dict(devices=jax.device_count(), finite=finite, **errors, rejected=rejected,
                   rows=training.process_batch_rows(8, mesh).tolist(), context=context,
                   **{f"{k}_{f}": results[k][f] for k in results
                      for f in ("losses", "spec", "shards")}), f)


def _kill_at(workdir: str, after_checkpoint: int | None, num_processes: int = 1):
  """SIGKILLs this process once checkpoint ``after_checkpoint`` is written and every process of
  the run has come here (none is left waiting in a collective with a dead one)."""
  deadline = time.monotonic() + 120
  def wait(done):
    while not done() and time.monotonic() < deadline:
      time.sleep(0.05)
  if after_checkpoint is not None:
    wait(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", str(after_checkpoint))))
  if num_processes > 1:
    open(os.path.join(workdir, f"killed.{jax.process_index()}"), "w").close()
    wait(lambda: all(os.path.exists(os.path.join(workdir, f"killed.{p}"))
                     for p in range(num_processes)))
  os.kill(os.getpid(), signal.SIGKILL)


def train(workdir: str, out_path: str, kill_at: int | None, after_checkpoint: int | None):
  def batches(step):
    if step == kill_at:
      _kill_at(workdir, after_checkpoint)
    return batch(step)

  config = training.TrainConfig(num_steps=10, warmup_steps=2, learning_rate=1e-2, log_every=2,
                                checkpoint_every=3, keep_checkpoints=2, progress_bar=False)
  result = training.train(_model(), config, batches, workdir)
  leaves = jax.device_get(jax.tree.leaves(result.state))
  np.savez(out_path, *leaves)


def dist(workdir: str, out_path: str, num_processes: int, process_id: int, port: int,
         kill_at: int | None, after_checkpoint: int | None):
  if num_processes > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id,
                               initialization_timeout=60)
  config = training.TrainConfig(num_steps=6, warmup_steps=2, learning_rate=1e-2, log_every=1,
                                checkpoint_every=2, keep_checkpoints=2, progress_bar=False,
                                mesh_shape=(2, jax.device_count() // 2, 1))
  mesh = parallel.make_mesh(*config.mesh_shape)
  rows = training.process_batch_rows(8, mesh)

  def batches(step):
    if step == kill_at:
      _kill_at(workdir, after_checkpoint, num_processes)
    return {name: x[rows] for name, x in batch(step).items()}

  model = DecoderLM(CONFIG.replace(num_layers=1), rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  result = training.train(model, config, batches, workdir, mesh=mesh)
  state = multihost_utils.process_allgather(result.state, tiled=True)  # every process takes part
  if jax.process_index() == 0:
    np.savez(out_path, *jax.tree.leaves(state), rows=rows, devices=jax.device_count(),
             losses=[m["loss"] for m in result.metrics], steps=[m["step"] for m in result.metrics])
  else:
    with open(out_path + f".{jax.process_index()}.json", "w") as f:
      json.dump(dict(rows=rows.tolist(), losses=[m["loss"] for m in result.metrics]), f)


if __name__ == "__main__":
  if sys.argv[1] == "shard":
    shard(sys.argv[2])
  elif sys.argv[1] == "dist":
    kill_at, after_checkpoint = ([int(a) for a in sys.argv[7:9]] + [None, None])[:2]
    dist(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]), kill_at, after_checkpoint)
  else:
    kill_at, after_checkpoint = ([int(a) for a in sys.argv[4:6]] + [None, None])[:2]
    train(sys.argv[2], sys.argv[3], kill_at, after_checkpoint)
