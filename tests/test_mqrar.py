"""The MQRAR experiment end to end: the default config, shrunken, trains a few steps per attention,
writes summary.json, the plot, checkpoints and the final report; a rerun reuses only the runs of
the same whole config."""

import importlib.util
import copy
import json
import logging
import os
import shutil
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # the experiment's library sits beside its main, as in lm1b

from helpers import run_as_one_and_two_processes  # pylint: disable=g-import-not-at-top,wrong-import-position
import logs  # pylint: disable=g-import-not-at-top,wrong-import-position
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The shrunken default config, trained once: ``(config, records, workdir)``."""
  config, workdir = _shrunken_config(), tmp_path_factory.mktemp("mqrar")
  return config, mqrar_lib.train_and_evaluate(config, str(workdir)), workdir


def test_default_config_trains_end_to_end(trained, tmp_path):
  config, records, workdir = trained
  tmp_path = shutil.copytree(workdir, tmp_path / "copy")

  with open(tmp_path / mqrar_lib.SUMMARY) as f:
    summary = json.load(f)
  assert summary == records
  assert sorted((r["attention"], r["seq_len"]) for r in summary) == sorted(
      (a, t) for a in config.attentions for t in config.eval_seq_lens)
  for r in summary:
    assert 0.0 <= r["accuracy"] <= 1.0
    assert r["d_model"] == 64 and r["num_keys"] == 4 and r["seed"] == 0
    assert r["train_seq_len"] == 32 and r["num_steps"] == 4
    assert r["chance"] == 1 / 16 and 0 < r["key_match_no_recency"] < 1
    # Every query of every eval sequence is scored: (T/2 - num_keys) per sequence.
    assert r["queries"] == config.batch_size * (r["seq_len"] // 2 - r["num_keys"])
  with open(tmp_path / mqrar_lib.PLOT, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  run_dirs = sorted(os.listdir(tmp_path / "runs"))
  assert len(run_dirs) == 3 and sorted({r["run"] for r in summary}) == run_dirs
  for name in run_dirs:
    run = tmp_path / "runs" / name
    assert (run / "checkpoints" / "4").is_dir()
    assert os.listdir(run / "tensorboard")
    result = json.loads((run / mqrar_lib.RUN_RESULT).read_text())
    assert result["config"]["num_steps"] == 4 and result["curve"]["step"] == [2, 4]

  # The report names every attention and eval length, the trained length, chance and the outputs.
  text = mqrar_lib.report(records, str(tmp_path))
  for attention in config.attentions:
    assert attention in text
  assert "T=32*" in text and "T=64" in text and "0.062" in text and "trained length" in text
  for output in ("summary.json", "mqrar.png", "tensorboard --logdir", "checkpoints"):
    assert output in text

  # A rerun of the same config finds every run finished and trains nothing.
  config = copy.deepcopy(config)
  config.progress_bar = True  # display only: not part of a run's identity
  assert mqrar_lib.train_and_evaluate(config, str(tmp_path)) == records


def test_changed_config_is_never_answered_with_old_results(trained, tmp_path, caplog):
  """Issue 15: rerunning with other num_steps on an old workdir reused the old runs."""
  config, old, workdir = trained
  tmp_path = shutil.copytree(workdir, tmp_path / "copy")
  config = copy.deepcopy(config)
  config.attentions = ("softmax_nope",)
  config.num_steps = 2
  caplog.set_level("INFO")
  new = mqrar_lib.train_and_evaluate(config, str(tmp_path))
  old = [r for r in old if r["attention"] == "softmax_nope"]
  assert [r["num_steps"] for r in new] == [2, 2]
  assert new[0]["config_hash"] != old[0]["config_hash"]
  assert json.loads((tmp_path / mqrar_lib.SUMMARY).read_text()) == new
  # Runs are counted (1, not one per eval record), and the other config's run is named with
  # what differs; it is kept, and its checkpoints are not resumed by the new run.
  assert "MQRAR: 1 runs, 1 to train, 0 already finished" in caplog.text
  assert "made with another config" in caplog.text and "num_steps: 4 -> 2" in caplog.text
  assert "listed 3 runs of another config" in caplog.text
  run_dirs = sorted(os.listdir(tmp_path / "runs"))
  assert len(run_dirs) == 4 and {old[0]["run"], new[0]["run"]} < set(run_dirs)
  assert sorted(os.listdir(tmp_path / "runs" / new[0]["run"] / "checkpoints")) == ["2"]


def test_each_process_supplies_its_rows(monkeypatch, tmp_path):
  """Training and evaluation batches are this process's rows of each global batch
  (``training.process_batch_rows``, as under ``jax.distributed``): with the rows reversed, the
  run trains and scores on the reversed global batches."""
  config = _shrunken_config()
  config.num_steps, config.eval_seq_lens = 2, (32,)
  asked, seen = [], {"train": [], "eval": []}
  monkeypatch.setattr(mqrar_lib.training, "process_batch_rows",
                      lambda b, mesh: asked.append(b) or np.arange(b)[::-1])
  train, evaluate = mqrar_lib.training.train, mqrar_lib.training.evaluate

  def spy_train(model, train_config, batches, workdir, **kw):
    seen["train"].append(batches(0))
    return train(model, train_config, batches, workdir, **kw)

  def spy_evaluate(eval_step, params, batches, sharding):
    seen["eval"].append(batches[0])
    return evaluate(eval_step, params, batches, sharding)
  monkeypatch.setattr(mqrar_lib.training, "train", spy_train)
  monkeypatch.setattr(mqrar_lib.training, "evaluate", spy_evaluate)
  mqrar_lib.train_and_evaluate(config, str(tmp_path))
  assert asked and set(asked) == {config.batch_size}
  run_cfg = mqrar_lib.run_config(config, next(iter(mqrar_lib.runs(config))))  # trained first
  rng = np.random.default_rng((run_cfg["seed"], mqrar_lib._TRAIN_STREAM, 0))
  want = mqrar_lib.make_batch(run_cfg, rng, run_cfg["seq_len"])
  for name, x in want.items():
    np.testing.assert_array_equal(seen["train"][0][name], x[::-1])
  rng = np.random.default_rng((run_cfg["seed"], mqrar_lib._EVAL_STREAM, 32))
  np.testing.assert_array_equal(seen["eval"][0]["inputs"],
                                mqrar_lib.make_batch(run_cfg, rng, 32)["inputs"][::-1])


def test_run_identity_covers_the_whole_config():
  config = _load_config()
  run = mqrar_lib.runs(config)[0]
  base = mqrar_lib.run_config(config, run)
  assert "progress_bar" not in base and base["seq_len"] == 32 and "attentions" not in base
  for field, value in (("warmup_steps", 10), ("num_steps", 10), ("reassign_prob", 0.5),
                       ("eval_seq_lens", (32,)), ("implementation", "scan")):
    changed = config.copy_and_resolve_references()
    changed[field] = value
    other = mqrar_lib.run_config(changed, run)
    assert mqrar_lib.config_hash(other) != mqrar_lib.config_hash(base), field
    assert mqrar_lib.differences(base, other) == [
        f"{field}: {base[field]!r} -> {json.loads(json.dumps(value))!r}"]


@pytest.mark.parametrize("variant", ["cpu", "sweep"])
def test_implementations_can_be_set_on_the_command_line(variant, monkeypatch):
  # The sweep's None ("the machine's default") must stay overridable: reporting a GPU workdir on
  # another machine names the GPU's implementations, which are part of its groups' identity.
  argv = ["prog", f"--config={EXPERIMENTS / 'configs' / 'mqrar.py'}:{variant}",
          "--config.implementation=pallas", "--config.softmax_implementation=cudnn"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
  flag_values(argv)
  config = flag_values.config
  assert (config.implementation, config.softmax_implementation) == ("pallas", "cudnn")


def test_log_filter_drops_only_the_tpu_note():
  def record(name, level, message):
    return logging.LogRecord(name, level, "/x/xla_bridge.py", 1, message, (), None)

  tpu = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so"
  assert not logs.quiet_logs(record("jax._src.xla_bridge", logging.INFO, tpu))
  assert logs.quiet_logs(record("jax._src.xla_bridge", logging.INFO,
                                "Unable to initialize backend 'cuda': no GPU"))
  assert logs.quiet_logs(record("jax._src.xla_bridge", logging.WARNING, tpu))


def test_plot_and_report_of_the_committed_sweep(tmp_path):
  # The sequential path's plot and report on one width of the committed (vmapped) sweep: 3 seeds
  # x 4 learning rates per setting, each setting at its best rate, as the sweep's own table.
  records = json.loads((EXPERIMENTS / "results" / "mqrar" / "summary.json").read_text())
  records = [r for r in records if r["d_model"] == 128]
  mqrar_lib.plot(records, str(tmp_path / "sweep.png"))
  assert (tmp_path / "sweep.png").stat().st_size > 10_000
  text = mqrar_lib.report(records, str(tmp_path))
  assert "mean of 3 seeds), at the best of 4 learning rates" in text and "T=256*" in text
  rows = {line[:38].strip(): line[38:].split() for line in text.splitlines()
          if "num_keys=" in line and "key match" not in line}
  table = (EXPERIMENTS / "results" / "mqrar" / "table.md").read_text().splitlines()
  cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
  expected = {f"{c[0]} num_keys={c[2]}": [m.split(" ± ")[0] for m in c[4:7]]
              for c in cells if c[1] == "128"}
  assert len(expected) == 12 and rows == expected


def test_sweep_config_runs():
  config = _load_config("sweep")
  runs = mqrar_lib.runs(config)
  assert len(runs) == 3 * 3 * 3 * 4 * 4  # attentions x seeds x widths x num_keys x learning rates
  assert len({mqrar_lib.run_name(r) for r in runs}) == len(runs)


def test_report_takes_each_settings_best_learning_rate():
  records = [{"attention": "stickbreaking", "seed": 0, "d_model": 64, "num_heads": 2,
              "train_seq_len": 32, "num_keys": 4, "seq_len": 32, "learning_rate": lr,
              "accuracy": acc, "eval_loss": 1.0, "num_steps": 8, "vocab_size": 32,
              "reassign_prob": 1.0} for lr, acc in ((1e-3, 0.25), (3e-3, 0.75))]
  text = mqrar_lib.report(records, "/tmp/w")
  assert "at the best of 2 learning rates" in " ".join(text.split())  # the prose is wrapped
  assert "0.750" in text and "0.250" not in text


def test_bad_config_is_named():
  config = _load_config()
  config.num_keys = ()
  with pytest.raises(ValueError, match="num_keys"):
    mqrar_lib.runs(config)
  with pytest.raises(ValueError, match="variant"):
    _load_config("gpu")


def test_two_processes_match_one(tmp_path):
  """Two ``jax.distributed`` processes of one CPU device each (the program's address flags) give
  the records of one process on 2 devices, bit for bit (the same partitioned program; 2-way
  reductions add alike in any order); process 0 alone prints the report and logs at INFO."""
  run_as_one_and_two_processes(
      EXPERIMENTS / "mqrar.py", lambda name: [
          f"--config={EXPERIMENTS / 'configs' / 'mqrar.py'}", f"--workdir={tmp_path / name}",
          "--config.num_steps=4", "--config.warmup_steps=1", "--config.log_every=2",
          "--config.checkpoint_every=2", "--config.batch_size=4", "--config.eval_batches=1",
          "--config.eval_seq_lens=(32,)", "--config.attentions=('stickbreaking',)",
          "--config.progress_bar=False"], tmp_path)
  summaries = [json.loads((tmp_path / name / mqrar_lib.SUMMARY).read_text())
               for name in ("one", "two")]
  timing = ("train_seconds",)
  one, two = ([{k: v for k, v in r.items() if k not in timing} for r in s] for s in summaries)
  assert len(one) == 1 and np.isfinite(one[0]["accuracy"]) and one[0]["queries"] > 0
  assert two == one
  outs = [(tmp_path / f"two.{p}.out").read_text() for p in range(2)]
  errs = [(tmp_path / f"two.{p}.err").read_text() for p in range(2)]
  assert "accuracy" in outs[0] and "accuracy" not in outs[1]  # (gloo's notes go to stdout)
  assert "jax.distributed: 2 processes, 2 devices" in errs[0] and "accuracy 0." in errs[0]
  assert not [line for line in errs[1].splitlines() if line.startswith("I")]


def test_distributed_flags_are_checked():
  result = subprocess.run([sys.executable, str(EXPERIMENTS / "mqrar.py"),
                           f"--config={EXPERIMENTS / 'configs' / 'mqrar.py'}", "--workdir=/tmp/x",
                           "--coordinator_address=localhost:1", "--num_processes=2"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(EXPERIMENTS.parent)))
  assert result.returncode != 0
  assert "--coordinator_address, --num_processes given without --process_id" in result.stderr
