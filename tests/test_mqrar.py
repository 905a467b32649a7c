"""The MQRAR experiment end to end: the default config, shrunken, trains a few steps per attention,
writes summary.json, the plot and checkpoints, and a rerun resumes from the summary."""

import importlib.util
import json
import os
import pathlib
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # the experiment's library sits beside its main, as in lm1b

import mqrar_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _load_config(variant="cpu"):
  path = EXPERIMENTS / "configs" / "mqrar.py"
  spec = importlib.util.spec_from_file_location("mqrar_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _shrunken_config():
  config = _load_config()
  config.num_steps = 4
  config.warmup_steps = 1
  config.log_every = 2
  config.checkpoint_every = 2
  config.batch_size = 4
  config.eval_batches = 1
  config.eval_seq_lens = (32, 64)
  config.progress_bar = False
  return config


def test_default_config_trains_end_to_end(tmp_path):
  config = _shrunken_config()
  records = mqrar_lib.train_and_evaluate(config, str(tmp_path))

  with open(tmp_path / mqrar_lib.SUMMARY) as f:
    summary = json.load(f)
  assert summary == records
  assert sorted((r["attention"], r["seq_len"]) for r in summary) == sorted(
      (a, t) for a in config.attentions for t in config.eval_seq_lens)
  for r in summary:
    for field in ("attention", "accuracy", "seq_len", "d_model", "num_keys", "seed"):
      assert field in r, field
    assert 0.0 <= r["accuracy"] <= 1.0
    assert r["d_model"] == 64 and r["num_keys"] == 4 and r["seed"] == 0
    assert r["train_seq_len"] == 32 and r["num_steps"] == 4
    # Every query of every eval sequence is scored: (T/2 - num_keys) per sequence.
    assert r["queries"] == config.batch_size * (r["seq_len"] // 2 - r["num_keys"])
  with open(tmp_path / mqrar_lib.PLOT, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  for attention in config.attentions:
    run = tmp_path / "runs" / f"{attention}-D64-N2-T32-K4-seed0"
    assert (run / "checkpoints" / "4").is_dir()
    assert os.listdir(run / "tensorboard")

  # A rerun finds every run in the summary and trains nothing.
  config.num_steps = 10**6  # would take hours if anything were retrained
  assert mqrar_lib.train_and_evaluate(config, str(tmp_path)) == records


def test_sweep_config_runs():
  config = _load_config("sweep")
  runs = mqrar_lib.runs(config)
  assert len(runs) == 3 * 3 * 3  # attentions x seeds x num_keys
  assert len({mqrar_lib.run_name(r) for r in runs}) == len(runs)


def test_bad_config_is_named():
  config = _load_config()
  config.num_keys = ()
  with pytest.raises(ValueError, match="num_keys"):
    mqrar_lib.runs(config)
  with pytest.raises(ValueError, match="variant"):
    _load_config("gpu")
