"""The vmapped MQRAR sweep (experiments/mqrar_sweep_lib.py) and its report (mqrar_report.py): the
device generator, one member's step against sbjax.training's, the best learning rate, and a
shrunken sweep end to end (outputs, skipping finished groups, resuming an interrupted one)."""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbjax import models, training
from sbjax.data import mqrar
from sbjax.parallel import make_mesh

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import mqrar_report  # pylint: disable=g-import-not-at-top,wrong-import-position
import mqrar_sweep_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _load_config(variant="cpu"):
  spec = importlib.util.spec_from_file_location("mqrar_config", EXPERIMENTS / "configs" / "mqrar.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_device_batch_is_mqrar():
  """Every member's batch (its own num_keys, under vmap) has the generator's layout, and its
  targets are the most recent values (recall_targets)."""
  args = dict(batch_size=16, seq_len=48, vocab_size=32, reassign_prob=1.0, max_keys=8)
  draw = jax.jit(jax.vmap(lambda key, k: mqrar_sweep_lib.device_batch(key, k, **args)))
  num_keys = np.array([1, 3, 8])
  batches = jax.device_get(draw(jax.random.split(jax.random.key(0), 3), jnp.asarray(num_keys)))
  for m, k in enumerate(num_keys):
    inputs, targets, mask = (batches[n][m] for n in ("inputs", "targets", "loss_mask"))
    want_targets, want_mask = mqrar.recall_targets(inputs)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(targets, want_targets)
    keys, values = inputs[:, 0::2], inputs[:, 1::2]
    assert ((keys >= 0) & (keys < 16)).all() and ((values >= 16) & (values < 32)).all()
    for row in keys:  # the first k pairs assign k distinct keys; no others appear
      assert len(set(row[:k])) == k and set(row) == set(row[:k])
    # reassign_prob=1: every query's next value differs from the one held.
    assert (inputs[:, 1:][mask[:, :-1]] != targets[mask]).all()
  # reassign_prob=0.3: about 30% of the queries see a new value.
  batch = jax.device_get(mqrar_sweep_lib.device_batch(
      jax.random.key(1), 4, **{**args, "batch_size": 256, "reassign_prob": 0.3}))
  changed = batch["inputs"][:, 1:][batch["loss_mask"][:, :-1]] != batch["targets"][batch["loss_mask"]]
  assert abs(changed.mean() - 0.3) < 0.02  # ~4.5k queries: 3 standard errors


def test_vmapped_step_is_the_library_step_per_member():
  """Two members (two seeds' models, two learning rates) stepped together under vmap: the second
  equals sbjax.training's train step run on it alone, after 2 steps."""
  config = models.LMConfig(vocab_size=16, num_layers=1, d_model=16, num_heads=2, mlp_dim=16,
                           attention="stickbreaking", implementation="xla")
  train_cfg = training.TrainConfig(num_steps=10, learning_rate=1.0, warmup_steps=2,
                                   progress_bar=False)
  lrs = (1e-2, 3e-3)
  batch = mqrar.make_batch(np.random.default_rng(0), batch_size=4, seq_len=16, vocab_size=16,
                           num_keys=3, reassign_prob=1.0)
  batch = {"inputs": batch.inputs, "targets": batch.targets, "loss_mask": batch.loss_mask}
  splits = [nnx.split(models.DecoderLM(config, rngs=nnx.Rngs(s)), nnx.Param, ...) for s in (0, 1)]
  graphdef, _, rest = splits[0]
  tx = training.make_optimizer(train_cfg)
  params = jax.tree.map(lambda *x: jnp.stack(x), *(p for _, p, _ in splits))
  opt_state = jax.vmap(tx.init)(params)
  step = jax.jit(jax.vmap(
      lambda p, o, lr: mqrar_sweep_lib.member_step(graphdef, rest, tx, p, o, batch, lr)))
  for _ in range(2):
    params, opt_state, sums = step(params, opt_state, jnp.asarray(lrs))
  mesh = make_mesh(1, 1)
  # Member 1 (not the first): its seed's model and its learning rate, not member 0's.
  for m, lr in [(1, lrs[1])]:
    cfg = train_cfg.replace(learning_rate=lr)
    tx_m = training.make_optimizer(cfg)
    g, r, state, shardings = training.init_train_state(
        models.DecoderLM(config, rngs=nnx.Rngs(m)), tx_m, mesh)
    train_step = training.make_train_step(g, r, tx_m, mesh, shardings)
    for _ in range(2):
      state, metrics = train_step(state, batch)
    np.testing.assert_allclose(sums["loss"][m], metrics["loss"], rtol=1e-6)
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x: x[m], params)),
                         jax.tree.leaves(state.params)):
      # The schedule times lr vs the schedule built at peak lr: float32 rounding of the update
      # (~1e-7 of lr) and so at most an ulp or two of each parameter, nothing else.
      np.testing.assert_allclose(got, want, rtol=2 * np.finfo(np.float32).eps, atol=1e-6 * lr)
    assert not np.allclose(jax.tree.leaves(params)[0][0], jax.tree.leaves(params)[0][1])


def _record(attention, keys, lr, seed, seq_len, accuracy, eval_loss=1.0):
  return {"attention": attention, "d_model": 64, "num_heads": 2, "train_seq_len": 32,
          "num_keys": keys, "learning_rate": lr, "seed": seed, "seq_len": seq_len,
          "accuracy": accuracy, "eval_loss": eval_loss, "key_match_no_recency": 0.3,
          "chance": 0.0625}


def test_best_learning_rate_by_mean_accuracy_at_the_trained_length():
  records = []
  for seed, (a, b) in enumerate([(0.9, 0.5), (0.3, 0.6), (0.9, 0.6)]):  # mean 0.7 vs 0.567
    records += [_record("stickbreaking", 8, 1e-3, seed, 32, a),
                _record("stickbreaking", 8, 3e-3, seed, 32, b),
                # At 4x the trained length 3e-3 is better: it must not decide.
                _record("stickbreaking", 8, 1e-3, seed, 128, 0.1),
                _record("stickbreaking", 8, 3e-3, seed, 128, 0.9)]
  # Another cell: a tie in accuracy, broken by the lower eval loss (3e-3).
  records += [_record("softmax_rope", 8, 1e-3, 0, 32, 0.5, eval_loss=2.0),
              _record("softmax_rope", 8, 3e-3, 0, 32, 0.5, eval_loss=1.5)]
  best = mqrar_report.best_learning_rates(records)
  assert best == {("stickbreaking", 64, 2, 32, 8): 1e-3, ("softmax_rope", 64, 2, 32, 8): 3e-3}
  rows = mqrar_report.cell_rows(records)
  assert [r["attention"] for r in rows] == ["stickbreaking", "softmax_rope"]
  sb = rows[0]
  assert sb["learning_rate"] == 1e-3 and sb["learning_rates"] == [1e-3, 3e-3]
  np.testing.assert_allclose(sb["lengths"]["32"]["mean"], 0.7)
  np.testing.assert_allclose(sb["lengths"]["32"]["std"], np.std([0.9, 0.3, 0.9]))
  assert sb["lengths"]["32"]["solved"] == 2 and sb["lengths"]["32"]["seeds"] == 3
  np.testing.assert_allclose(sb["lengths"]["128"]["mean"], 0.1)
  table = mqrar_report.markdown_table(rows)
  assert "| stickbreaking | 64 | 8 | 0.001 | 0.700 ± 0.283 | 0.100 ± 0.000 | 2/3 |" in table


def _tiny_config():
  config = _load_config()
  config.vmap = True
  config.attentions = ("stickbreaking",)
  config.d_model = (16,)
  config.seq_len = (16,)
  config.num_keys = (2, 3)
  config.learning_rates = (1e-3, 1e-2)
  config.vocab_size = 16
  config.eval_seq_lens = (16, 32)
  config.eval_batches = 1
  config.batch_size = 2
  config.num_steps = 4
  config.warmup_steps = 1
  config.log_every = 2
  config.checkpoint_every = 2
  config.analysis_batch = 2
  config.compile_ahead = False
  config.map_d_model, config.map_num_keys, config.map_len = 16, 2, 8
  return config


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """The tiny sweep trained once: ``(config, records, workdir)``."""
  config, workdir = _tiny_config(), tmp_path_factory.mktemp("sweep")
  return config, mqrar_sweep_lib.train_and_evaluate(config, str(workdir)), workdir


def test_sweep_end_to_end_and_finished_groups_are_skipped(swept, monkeypatch):
  config, records, workdir = swept
  assert len(records) == 2 * 2 * 1 * 2  # keys x lrs x seeds x eval lengths
  for r in records:
    assert 0 <= r["accuracy"] <= 1
    # Every query before the eval length, on eval_batches x batch_size sequences.
    assert r["queries"] == 2 * (r["seq_len"] // 2 - r["num_keys"])
  assert json.loads((workdir / "summary.json").read_text()) == records
  for name in mqrar_report.OUTPUTS.values():
    assert (workdir / name).exists(), name
  (group,) = (workdir / "groups").iterdir()
  assert not (group / "checkpoints").exists()  # deleted once the group's results are written
  lines = [json.loads(x) for x in (group / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == [2, 4] and len(lines[0]["loss"]) == 4
  recency = json.loads((workdir / "recency.json").read_text())
  assert len(recency) == 4 and np.asarray(recency[0]["recent"]).shape == (2, 2)
  assert "init" in recency[0]
  # A rerun finds the group finished: nothing is compiled or trained.
  monkeypatch.setattr(mqrar_sweep_lib._Compiled, "_compile", lambda self: pytest.fail("compiled"))
  assert mqrar_sweep_lib.train_and_evaluate(config, str(workdir)) == records


def test_interrupted_group_resumes_from_its_checkpoint(swept, tmp_path, monkeypatch):
  """A group killed right after its step-2 checkpoint resumes there and ends with the
  uninterrupted sweep's results."""
  config, records, _ = swept
  save = training.checkpoint.Checkpointer.save

  def save_then_die(self, state, *, force=False):
    saved = save(self, state, force=force)
    if int(state.step) == 2:
      raise KeyboardInterrupt  # as a process killed after the save
    return saved

  monkeypatch.setattr(training.checkpoint.Checkpointer, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    mqrar_sweep_lib.train_and_evaluate(config, str(tmp_path))
  (group,) = (tmp_path / "groups").iterdir()
  assert sorted(p.name for p in (group / "checkpoints").iterdir()) == ["2"]
  assert not (group / "result.json").exists()
  monkeypatch.setattr(training.checkpoint.Checkpointer, "save", save)
  # The restored state must be the one trained on: the first chunk is not run again.
  steps = []
  monkeypatch.setattr(training, "read_metrics_log", lambda path, upto: steps.append(upto)
                      or real_read(path, upto))
  resumed = mqrar_sweep_lib.train_and_evaluate(config, str(tmp_path))
  assert steps == [2]
  for got, want in zip(resumed, records):
    assert got["accuracy"] == want["accuracy"] and got["eval_loss"] == want["eval_loss"]
    assert got["train_loss"] == want["train_loss"]


real_read = training.read_metrics_log


def test_sweep_in_mixed_precision(tmp_path):
  """The GPU sweep's dtype: bf16 compute (fp32 parameters) trains and scores every arm."""
  config = _tiny_config()
  config.attentions = ("stickbreaking", "softmax_rope")
  config.dtype = "bfloat16"
  records = mqrar_sweep_lib.train_and_evaluate(config, str(tmp_path))
  assert {r["attention"] for r in records} == {"stickbreaking", "softmax_rope"}
  for r in records:
    assert np.isfinite(r["train_loss"]) and np.isfinite(r["eval_loss"]), r
    assert 0 <= r["accuracy"] <= 1
  group = mqrar_sweep_lib.groups(config)[0]
  model = mqrar_sweep_lib.lm_config(mqrar_sweep_lib.group_config(config, group))
  assert model.dtype == "bfloat16"


def test_sweep_config():
  config = _load_config("sweep")
  groups = mqrar_sweep_lib.groups(config)
  assert len(groups) == 9 and [g["d_model"] for g in groups[:3]] == [64, 64, 64]
  g = mqrar_sweep_lib.group_config(config, groups[0])
  assert len(mqrar_sweep_lib.members(g)) == 4 * 4 * 3  # 432 runs in all
  assert "progress_bar" not in g and "compile_ahead" not in g and g["learning_rates"]
  assert g["dtype"] == "bfloat16" and g["num_steps"] == 4000
  mqrar_sweep_lib.check_config(config)
  bad = _load_config("sweep")
  bad.log_every = 300
  with pytest.raises(ValueError, match="num_steps must be a multiple of config.log_every"):
    mqrar_sweep_lib.check_config(bad)
  bad = _load_config("sweep")
  bad.eval_seq_lens = (512, 1024)
  with pytest.raises(ValueError, match="eval_seq_lens"):
    mqrar_sweep_lib.check_config(bad)
  bad = _load_config("sweep")
  bad.learning_rates = (1e-3, 0.0)
  with pytest.raises(ValueError, match="learning_rates"):
    mqrar_sweep_lib.check_config(bad)


def test_committed_results_are_the_sweep_config_and_its_table():
  # experiments/results/mqrar/ holds the GPU sweep: each group's config is the current sweep
  # config's (so rerunning the README's command reproduces it), and table.md is what the report
  # computes from the committed runs.
  results = EXPERIMENTS / "results" / "mqrar"
  config = _load_config("sweep")
  config.implementation, config.softmax_implementation = "pallas", "cudnn"  # as on the GPU
  for group in mqrar_sweep_lib.groups(config):
    g = mqrar_sweep_lib.group_config(config, group)
    path = results / "groups" / mqrar_sweep_lib.group_dir_name(g) / "config.json"
    assert json.loads(path.read_text()) == g, path
  records = json.loads((results / "summary.json").read_text())
  assert len(records) == 432 * 3 and all(np.isfinite(r["accuracy"]) for r in records)
  entries = json.loads((results / "recency.json").read_text())
  rows = mqrar_report.cell_rows(records)
  table = mqrar_report.markdown_table(rows, mqrar_report.recency_rows(entries, records))
  assert table + "\n" == (results / "table.md").read_text()
