"""experiments/lm_throughput.py --run_dir: a finished run's trained weights timed on real text."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from flax import nnx
import jax
import numpy as np

from helpers import tiny_length_extrapolation_run

SCRIPT = pathlib.Path(__file__).parent.parent / "experiments" / "lm_throughput.py"


def _run(*args):
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        env={"PYTHONPATH": str(SCRIPT.parent.parent), "JAX_PLATFORMS": "cpu",
                             "PATH": "/usr/bin:/bin"}, timeout=600)


def test_load_run_restores_the_trained_weights_with_overrides(tmp_path):
  sys.path.insert(0, str(SCRIPT.parent))
  import generate_lib  # pylint: disable=g-import-not-at-top
  run_dir, trained = tiny_length_extrapolation_run(tmp_path)
  model, tokenizer = generate_lib.load_run(str(run_dir), implementation="xla")
  assert model.config.implementation == "xla" and tokenizer.vocab_size == model.config.vocab_size
  want, got = nnx.state(trained, nnx.Param), nnx.state(model, nnx.Param)
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  fresh = nnx.state(type(model)(model.config, rngs=nnx.Rngs(0)), nnx.Param)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(got)))


def test_times_the_trained_weights_of_a_run_on_its_tokenized_text(tmp_path):
  run_dir, _ = tiny_length_extrapolation_run(tmp_path)
  out = tmp_path / "out.json"
  proc = _run(f"--run_dir={run_dir}", f"--text_file={tmp_path / 'book.txt'}", "--batch=2",
              "--seq_len=32", "--warmup=1", "--steps=2", "--attentions=stickbreaking",
              "--implementation=xla", "--fallback=", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  run = result["runs"]["stickbreaking[xla]"]
  assert run["finite"] and run["tokens_per_s"] > 0, run
  # The run is stick-breaking: asking for softmax is refused, naming the flag.
  proc = _run(f"--run_dir={run_dir}", f"--text_file={tmp_path / 'book.txt'}", "--batch=1",
              "--seq_len=16", "--warmup=1", "--steps=1", "--attentions=softmax_rope", "--fallback=")
  assert proc.returncode != 0
  assert "--attentions: the run in --run_dir is 'stickbreaking', got ['softmax_rope']" in proc.stderr
