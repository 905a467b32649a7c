"""Test-only helpers: the definition as a loop, a uniform call for every implementation, tiny
runs of the experiment programs."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import portpicker

import sbjax
from sbjax.platform import on_nvidia_gpu
# Re-exported for the test files that import them from here.
from sbjax.testing import Shape, assert_within_tolerance, float64_result, random_inputs, rel_rms

__all__ = ["SMALL_BLOCKS", "Shape", "assert_within_tolerance", "attention_fn", "far_inputs",
           "float64_result", "random_inputs", "rel_rms", "run_as_one_and_two_processes", "sigmoid",
           "stick_loop"]


def stick_loop(q, k, v, scale, seg=None, attend_current=False, forget_gate=None):
  """The definition as a NumPy float64 loop: each query breaks the stick key by key, nearest first.

  q ``[B, T, N, H]``, k ``[B, T, K, H]``, v ``[B, T, K, Hv]``, optional forget-gate logits
  ``[B, T, K]`` (key ``i`` takes ``sigmoid(g_i) sigmoid(z_ji)``) -> ``(out [B, T, N, Hv], rem [B, T, N])``.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, _ = q.shape
  g = n // k.shape[2]
  f = np.ones((b, t, k.shape[2])) if forget_gate is None else sigmoid(forget_gate)
  out = np.zeros((b, t, n, v.shape[-1]))
  rem = np.ones((b, t, n))
  for bi, j, ni in np.ndindex(b, t, n):
    stick = 1.0
    for i in range(j if attend_current else j - 1, -1, -1):
      if seg is not None and seg[bi, i] != seg[bi, j]:
        continue  # invisible: the stick is unchanged
      beta = f[bi, i, ni // g] * sigmoid(scale * q[bi, j, ni] @ k[bi, i, ni // g])
      out[bi, j, ni] += stick * beta * v[bi, i, ni // g]
      stick *= 1.0 - beta
    rem[bi, j, ni] = stick
  return out, rem


def far_inputs(seed, shape, shift, dtype=np.float32):
  """Inputs whose logits at scale 0.25 are about ``shift + N(0, 0.25^2)``: every key takes a small
  share, so sticks last long (a head that attends far back)."""
  q, k, v, _ = random_inputs(seed, shape, np.float32, logit_scale=0.5)
  q = q.at[..., 0].set(1.0)
  k = (k * 0.5).at[..., 0].set(shift / 0.25)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def sigmoid(x):
  """Float64 logistic function, exact at +-inf."""
  x = np.asarray(x, np.float64)
  with np.errstate(over="ignore"):
    return 1.0 / (1.0 + np.exp(-x))


# Small blocks, so that the interpreted kernels cross several query and key blocks, masked and not,
# with different query blocks in the forward, dq and dk/dv kernels.
SMALL_BLOCKS = sbjax.BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_bwd=16, block_q_dkv=32)


def attention_fn(implementation: str, **fixed):
  """``f(q, k, v, **kw) -> (out, rem)`` for one implementation (``"pallas"`` runs interpreted,
  ``"pallas_mosaic_gpu"`` interpreted unless on an NVIDIA GPU)."""
  if implementation == "pallas":
    fixed.setdefault("interpret", True)
    fixed.setdefault("block_sizes", SMALL_BLOCKS)
  if implementation == "pallas_mosaic_gpu":
    fixed.setdefault("interpret", not on_nvidia_gpu())
    if fixed["interpret"]:
      # One warpgroup: the interpreter once hung on the op's default two-warpgroup forward in a
      # loaded CI run (test_pallas_mosaic_gpu.py keeps testing that structure, and interpret
      # mode differentiates through this one anyway); compiled, the default tiling.
      fixed.setdefault("block_sizes", sbjax.MosaicBlockSizes())
  return functools.partial(
      sbjax.stick_breaking_attention, implementation=implementation, return_remainder=True, **fixed)


def tiny_length_extrapolation_run(tmp_path):
  """A 2-step stick-breaking run laid out as experiments/length_extrapolation.py writes it
  (``runs/<name>/run.json`` + checkpoints, ``tokenizer.json`` two levels up; its text in
  ``book.txt``) -> ``(run_dir, the trained model)``."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sbjax import data, models, training  # pylint: disable=g-import-not-at-top
  text = "It was the best of times, it was the worst of times. " * 20
  tokenizer = data.train_tokenizer([text], 300, str(tmp_path / "tokenizer.json"))
  ids = tokenizer.encode(text).astype(np.int32)
  config = models.lm_config("tiny", vocab_size=tokenizer.vocab_size, num_layers=1, d_model=16,
                            mlp_dim=16)
  train_config = training.TrainConfig(num_steps=2, warmup_steps=1, checkpoint_every=2,
                                      eval_every=0, progress_bar=False)
  run_dir = tmp_path / "runs" / "stickbreaking-seed0-test"
  batches = lambda step: {"inputs": ids[None, step:step + 16],
                          "targets": ids[None, step + 1:step + 17]}
  model = models.DecoderLM(config, rngs=nnx.Rngs(0))
  training.train(model, train_config, batches, str(run_dir))  # leaves the trained weights in model
  (run_dir / "run.json").write_text(json.dumps(
      {"attention": "stickbreaking", "seed": 0, "model": dataclasses.asdict(config),
       "train": dataclasses.asdict(train_config)}))
  (tmp_path / "book.txt").write_text(text)
  return run_dir, model


def run_as_one_and_two_processes(program, flags, log_dir, *, timeout: int = 300):
  """Runs ``program`` (an experiments/ script) twice at once: as one process of 2 CPU devices
  (``"one"``) and as two ``jax.distributed`` processes of one device each on localhost
  (``"two"``, through the program's ``--coordinator_address``, ``--num_processes`` and
  ``--process_id``). ``flags(name)`` gives each run's own flags; process ``p``'s stdout and
  stderr go to ``log_dir / f"{name}.{p}.out"`` and ``.err``. Asserts that every process exits 0
  (showing its stderr's end), killing the rest if one does not."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = portpicker.pick_unused_port()
  procs = {}
  for name, num_processes, devices in (("one", 1, 2), ("two", 2, 1)):
    env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS=" ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"]))
    for process in range(num_processes):
      dist = ([f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
               f"--process_id={process}"] if num_processes > 1 else [])
      with open(log_dir / f"{name}.{process}.out", "w") as out, \
           open(log_dir / f"{name}.{process}.err", "w") as err:
        procs[name, process] = subprocess.Popen(
            [sys.executable, str(program), *flags(name), *dist], env=env, stdout=out, stderr=err)
  try:
    for (name, process), proc in procs.items():
      proc.wait(timeout=timeout)
      assert proc.returncode == 0, (log_dir / f"{name}.{process}.err").read_text()[-3000:]
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
