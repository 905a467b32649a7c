"""sbjax.training: schedule, loss masks, the loop's outputs, the sharded step, bit-exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import portpicker
import pytest
import tqdm
from flax import nnx

from sbjax import training
from sbjax.models import DecoderLM, lm_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))


def _run_worker(*args, devices: int = 1, expect_kill: bool = False) -> str:
  """Runs tests/train_worker.py; returns its stderr."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = " ".join(  # must be set before jax starts, hence the subprocess
      [env.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"])
  proc = subprocess.run([sys.executable, WORKER, *map(str, args)], env=env, capture_output=True,
                        text=True, timeout=600)
  if expect_kill:
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  else:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_schedule_and_weight_decay_mask():
  config = training.TrainConfig(num_steps=100, warmup_steps=10, learning_rate=1e-3,
                                final_lr_ratio=0.1)
  schedule = training.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)],
                             [0.0, 5e-4, 1e-3, 1e-4], rtol=1e-6)
  model = nnx.eval_shape(lambda: DecoderLM(
      lm_config("tiny", remainder="bias", tie_embeddings=False), rngs=nnx.Rngs(0)))
  mask = training.weight_decay_mask(nnx.state(model, nnx.Param))
  block = mask["blocks"][0]
  assert mask["embedding"].get_value() and mask["output_kernel"].get_value()
  assert block["attention"]["query_kernel"].get_value() and block["mlp"]["down_kernel"].get_value()
  assert not mask["final_norm"]["scale"].get_value()
  assert not block["attention"]["remainder_bias"].get_value()


def test_bad_train_config_names_the_field():
  with pytest.raises(ValueError, match="num_steps"):
    training.TrainConfig(num_steps=0)
  for bad in [(1, 1, 1, 1), (1,), (0, 1), (2, 1, 0), (-1, -1), (2.0, 1)]:
    with pytest.raises(ValueError, match=r"mesh_shape must be \(data, model\) or \(data, model, "):
      training.TrainConfig(mesh_shape=bad)
  # (data, model) and (data, model, context); lists (as read back from JSON) become tuples.
  assert training.TrainConfig(mesh_shape=(-1, 2)).mesh_shape == (-1, 2)
  assert training.TrainConfig(mesh_shape=[2, 1, 4]).mesh_shape == (2, 1, 4)


def test_cross_entropy_loss_mask():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)))
  mask = jnp.asarray(rng.random((2, 5)) < 0.5)
  loss, sums = training.cross_entropy(logits, targets, mask)
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(loss, per_token[mask].mean(), rtol=1e-6)
  assert float(sums["tokens"]) == int(mask.sum())
  # Masked positions do not matter, whatever their targets.
  other = jnp.where(mask, targets, (targets + 3) % 7)
  assert float(training.cross_entropy(logits, other, mask)[0]) == float(loss)


def test_train_loop_metrics_eval_and_checkpoints(tmp_path):
  model = DecoderLM(lm_config("tiny", attention="softmax_rope"),
                    rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  tokens = np.random.default_rng(0).integers(0, 256, size=(4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  config = training.TrainConfig(num_steps=7, warmup_steps=1, learning_rate=1e-2, log_every=3,
                                eval_every=3, checkpoint_every=3, keep_checkpoints=2,
                                progress_bar=False)
  result = training.train(model, config, [batch] * 7, str(tmp_path), eval_batches=lambda: [batch])
  assert [m["step"] for m in result.metrics] == [3, 6, 7]
  assert [m["step"] for m in result.eval_metrics] == [3, 6, 7]
  losses = [m["loss"] for m in result.eval_metrics]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert int(result.state.step) == 7
  # The final step is saved although 7 is off the interval; only the newest two are kept.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]
  events = os.listdir(tmp_path / "tensorboard")
  assert events and all(os.path.getsize(tmp_path / "tensorboard" / e) > 0 for e in events)
  # The model object holds the trained parameters.
  np.testing.assert_array_equal(model.final_norm.scale[...],
                                result.state.params["final_norm"]["scale"][...])


def _tiny_run(workdir, events=None, **changes):
  """A 3-step run of a tiny model on one batch, evaluated at the end; ``events`` records each
  batch asked for."""
  model = DecoderLM(lm_config("tiny", attention="softmax_rope"), rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 256, size=(4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  config = training.TrainConfig(**{**dict(num_steps=3, warmup_steps=1, learning_rate=1e-2,
                                          log_every=1, checkpoint_every=2, progress_bar=False),
                                   **changes})

  def batches(step):
    if events is not None:
      events.append(("batch", step))
    return batch

  return training.train(model, config, batches, str(workdir), eval_batches=lambda: [batch])


def test_finished_workdir_returns_the_run_and_refuses_another_config(tmp_path, caplog,
                                                                     monkeypatch):
  events = []

  class RecordingBar(tqdm.tqdm):
    def __init__(self, *args, **kwargs):
      events.append(("bar", kwargs["initial"]))
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(training.loop, "tqdm", RecordingBar)
  first = _tiny_run(tmp_path, events)
  assert [m["step"] for m in first.metrics] == [1, 2, 3]
  # The progress bar's clock (its rate and ETA) starts after the first step, which compiles.
  assert events == [("batch", 0), ("bar", 1), ("batch", 1), ("batch", 2)]
  # Rerun on the finished workdir: nothing is trained, the run's metrics are read back and the
  # final evaluation is redone; the log says so. Display and mesh fields may differ (a 3-axis
  # mesh_shape resumes a run saved with a 2-axis one).
  again = _tiny_run(tmp_path, log_every=2, progress_bar=True, mesh_shape=(-1, 1, 1))
  assert "already complete" in caplog.text
  assert int(again.state.step) == 3
  assert again.metrics == first.metrics
  assert [m["step"] for m in again.eval_metrics] == [3]
  np.testing.assert_allclose(again.eval_metrics[-1]["loss"], first.eval_metrics[-1]["loss"],
                             rtol=1e-6)
  # Checkpoints of one config are never resumed under another: the error names what differs.
  with pytest.raises(ValueError, match=r"learning_rate: 0\.01 -> 0\.02.*num_steps: 3 -> 5"):
    _tiny_run(tmp_path, learning_rate=2e-2, num_steps=5)


def test_shard_step_on_8_devices_matches_one_device(tmp_path):
  out = tmp_path / "shard.json"
  _run_worker("shard", out, devices=8)
  r = json.loads(out.read_text())
  assert r["devices"] == 8 and r["finite"]
  assert r["mesh_spec"] == "P(None, 'model', None)" and r["mesh_shards"] == 8
  np.testing.assert_allclose(r["mesh_losses"], r["one_losses"], rtol=1e-5)
  # fp32 reduction order differs between the meshes: gradients agree to rounding noise (1e-5,
  # the fp32 noise floor of tests/helpers.py). Adam turns a gradient element near its eps into a
  # step of up to +-lr either way, so parameters after two steps are held to 1e-4 relative RMS.
  assert r["grads_rel_rms"] < 1e-5
  assert r["params_rel_rms"] < 1e-4
  # One process supplies every row; 6 rows over 4 "data" shards are refused.
  assert r["rows"] == list(range(8))
  assert "batch_size=6 is not divisible by the 4 batch shards" in r["rejected"][0]
  assert "batch['inputs'] has shape (6, 16)" in r["rejected"][1]
  assert r["context"] == dict(rows=list(range(8)), spec="P('data', 'context')",
                              shard=[4, 4], equal=True)


def test_resume_after_sigkill_is_bit_exact(tmp_path):
  """Killed between saves (at step 5, once save 3 is written) and right after one (as save 6 is
  being written), with a stray partial checkpoint added, the resumed run ends bit-identical
  (parameters, optimiser state, step) to an uninterrupted one."""
  reference = subprocess.Popen(  # runs beside the interrupted sequence
      [sys.executable, WORKER, "train", tmp_path / "ref", tmp_path / "ref.npz"],
      env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  workdir = tmp_path / "run"
  _run_worker("train", workdir, tmp_path / "unused.npz", 5, 3, expect_kill=True)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
  log = _run_worker("train", workdir, tmp_path / "unused.npz", 6, expect_kill=True)
  assert "Resuming from step 3" in log
  partial = workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1"  # as a killed save leaves it
  partial.mkdir()
  (partial / "garbage").write_text("not a checkpoint")
  log = _run_worker("train", workdir, tmp_path / "run.npz")
  assert "Resuming from step 3" in log or "Resuming from step 6" in log
  assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "9"]

  ref, run = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  assert len(ref.files) == len(run.files) > 3
  for name in ref.files:
    assert np.isfinite(ref[name]).all(), name
    np.testing.assert_array_equal(run[name], ref[name], err_msg=name)
  assert int(run["arr_0"]) == 10  # the step


def _start_dist(workdir, out, *kill, num_processes: int = 2, devices: int = 2):
  """Starts the processes of one ``train_worker.py dist`` run (``jax.distributed`` on localhost,
  ``devices`` CPU devices each); their stderr goes to ``workdir.<process>.log``."""
  port = portpicker.pick_unused_port()
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=" ".join(
      [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"]),
      # One compilation cache for every run of the test: the rerun compiles nothing.
      JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  procs = []
  for process in range(num_processes):
    log = open(f"{workdir}.{process}.log", "w")
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, "dist", *map(str, (workdir, out, num_processes, process, port,
                                                   *kill))],
        env=env, stdout=subprocess.DEVNULL, stderr=log))
    log.close()
  return procs


def _wait_dist(procs, workdir, returncode: int = 0) -> list[str]:
  """Waits for the processes of ``_start_dist`` (killing all if one fails); their logs."""
  try:
    for proc in procs:
      proc.wait(timeout=300)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  logs = [open(f"{workdir}.{process}.log").read() for process in range(len(procs))]
  for proc, log in zip(procs, logs):
    assert proc.returncode == returncode, log[-3000:]
  return logs


def test_two_processes_match_one_process_and_resume(tmp_path):
  """Two processes of 2 CPU devices each (``jax.distributed``, gloo collectives) train on a
  (data 2, model 2, context 1) mesh, each supplying its own 4 of the 8 rows of every batch. They
  are killed together after checkpoint 2 is written, rerun, and end bit-identical (logged loss
  curve, parameters, optimiser state, step) to one process training on 4 devices with the same
  mesh, which compiles the same partitioned program. Equality, not a tolerance: each device
  computes the same partial results in both runs, and every cross-device reduction combines 2
  partials (a 2-way mesh axis), and a + b == b + a in floating point whatever order gloo or the
  in-process all-reduce adds them in (more than 2 participants could round differently)."""
  ref = _start_dist(tmp_path / "ref", tmp_path / "ref.npz", num_processes=1, devices=4)
  run = tmp_path / "run"
  _wait_dist(_start_dist(run, tmp_path / "unused.npz", 3, 2), run, returncode=-signal.SIGKILL)
  assert sorted(os.listdir(run / "checkpoints")) == ["2"]
  logs = _wait_dist(_start_dist(run, tmp_path / "run.npz"), run)
  _wait_dist(ref, tmp_path / "ref")
  # Restored by both processes; logged (stderr, metrics, TensorBoard) by process 0 alone.
  assert "Resuming from step 2" in logs[0] and "Resuming" not in logs[1]
  assert sorted(os.listdir(run / "checkpoints")) == ["4", "6"]
  logged = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
  assert logged == [1, 2, 3, 4, 5, 6]
  assert len(os.listdir(run / "tensorboard")) == 2  # one events file per run

  ref, out = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
  other = json.loads(open(f"{tmp_path / 'run.npz'}.1.json").read())
  assert int(ref["devices"]) == int(out["devices"]) == 4
  np.testing.assert_array_equal(ref["rows"], np.arange(8))
  np.testing.assert_array_equal(out["rows"], np.arange(4))  # process 0: the first half
  np.testing.assert_array_equal(other["rows"], np.arange(4, 8))
  np.testing.assert_array_equal(out["steps"], [1, 2, 3, 4, 5, 6])
  assert np.isfinite(ref["losses"]).all() and ref["losses"][-1] != ref["losses"][0]
  np.testing.assert_array_equal(out["losses"], ref["losses"])
  np.testing.assert_array_equal(other["losses"], ref["losses"])  # every process returns them
  leaves = [name for name in ref.files if name.startswith("arr_")]
  assert len(leaves) > 3 and sorted(out.files) == sorted(ref.files)
  for name in leaves:
    assert np.isfinite(ref[name]).all(), name
    np.testing.assert_array_equal(out[name], ref[name], err_msg=name)
  assert int(out["arr_0"]) == 6  # the step
