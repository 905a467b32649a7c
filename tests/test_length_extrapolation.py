"""The length-extrapolation experiment end to end on a shrunken cpu config, and its parts."""

import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sbjax import models, training
from sbjax.parallel import batch_sharding, make_mesh

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
sys.path.insert(0, EXPERIMENTS)  # the experiment's library sits beside its main, as in lm1b
import length_extrapolation_lib as lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from helpers import run_as_one_and_two_processes  # pylint: disable=g-import-not-at-top
from test_text_data import EXCERPTS, make_archive  # pylint: disable=g-import-not-at-top


def get_config(variant="cpu"):
  path = os.path.join(EXPERIMENTS, "configs", "length_extrapolation.py")
  spec = importlib.util.spec_from_file_location("length_extrapolation_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)

ARMS = ("stickbreaking", "softmax_rope", "softmax_nope")


def tiny_config(tmp):
  archive, _ = make_archive(str(tmp))
  c = get_config("cpu")
  c.corpus_archive = archive
  c.corpus_sha256 = ""  # the excerpts, not the ELTeC archive
  c.data_dir = str(tmp / "data")
  c.max_train_books = 0
  c.vocab_size = 320
  c.model_overrides = {"num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_dim": 64}
  c.train_len = 16  # L = 256
  c.batch_size = 4
  c.num_steps = 3
  c.log_every = 1
  c.checkpoint_every = 3
  c.max_eval_windows_per_book = 1
  c.loss_chunk = 128
  c.bootstrap_samples = 50
  c.progress_bar = False
  c.qk_layers = (0,)
  c.qk_window_len = 64
  return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(config, workdir, records) of one finished run of the three arms."""
  tmp = tmp_path_factory.mktemp("le")
  config = tiny_config(tmp)
  workdir = str(tmp / "work")
  return config, workdir, lib.train_and_evaluate(config, workdir)


def test_end_to_end_writes_every_output(finished):
  config, workdir, records = finished
  assert [(r["attention"], r["split"]) for r in records] == (
      [(a, "validation") for a in ARMS] + [(a, "test") for a in ARMS])  # test once, at the end
  for name in ("summary.json", *lib.PLOTS.values(), "tokenizer.json", "qk_stickbreaking.npz"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f) == records
  for r in records:
    assert r["train_len"] == 16 and r["eval_len"] == 256 and r["seed"] == 0
    assert [(b["start"], b["end"]) for b in r["position_bins"]] == [
        (0, 16), (16, 32), (32, 64), (64, 128), (128, 256)]
    assert list(r["ppl_at"]) == ["16", "32", "64", "128", "256"]
    for b in r["position_bins"]:
      assert b["ci_low"] <= b["mean_loss"] <= b["ci_high"]
      assert np.isfinite(b["mean_loss"])
    assert r["books"] == (5 if r["split"] == "validation" else 10)
    assert r["num_steps"] == 3 and r["params"] > 0
  qk = np.load(os.path.join(workdir, "qk_stickbreaking.npz"))
  assert qk["query"].shape == (1, 1, 64, 2, 16) and qk["key"].shape == (1, 1, 64, 2, 16)


def test_rerun_reuses_and_a_changed_config_does_not(finished, tmp_path):
  config, workdir, records = finished
  caches = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(workdir) for f in fs
                  if f.endswith(".npy"))
  stamps = [os.path.getmtime(p) for p in caches]
  assert lib.train_and_evaluate(config, workdir) == records
  assert [os.path.getmtime(p) for p in caches] == stamps  # nothing scored (or trained) again
  changed = config.copy_and_resolve_references()
  changed.learning_rate = 1e-3
  names = {lib.run_name(lib.run_spec(c, "stickbreaking", 0, lib.prepare_data(c), 3))
           for c in (config, changed)}
  assert len(names) == 2  # its own run directory, never the other config's checkpoints


def test_records_name_the_machine_that_scored_the_cached_losses(finished, tmp_path):
  config, workdir, records = finished
  copy = str(tmp_path / "work")
  shutil.copytree(workdir, copy)
  sidecars = sorted(os.path.join(dp, f[:-len(".npy")] + ".json")
                    for dp, _, fs in os.walk(copy) for f in fs if f.endswith(".npy"))
  assert len(sidecars) == len(records)
  for path in sidecars:
    with open(path) as f:
      assert json.load(f)["device"] == records[0]["device"]
  with open(sidecars[0]) as f:
    scored = json.load(f)
  lib._write_json(sidecars[0], {**scored, "device": "gpu:NVIDIA H100 80GB HBM3"})
  rewritten = lib.train_and_evaluate(config, copy)  # nothing trained or scored again
  moved = [(a, b) for a, b in zip(records, rewritten) if a != b]
  assert len(moved) == 1 and moved[0][1] == {**moved[0][0], "device": "gpu:NVIDIA H100 80GB HBM3"}


def test_eval_text_dir_scores_trained_runs_without_training(finished, tmp_path):
  config, workdir, _ = finished
  texts = tmp_path / "my_texts"
  texts.mkdir()
  for name in sorted(os.listdir(EXCERPTS))[:2]:
    with open(os.path.join(EXCERPTS, name)) as f:
      (texts / name.replace("ENG", "mine_")).write_text(f.read())
  checkpoints = sorted(os.listdir(os.path.join(workdir, "runs")))
  user = config.copy_and_resolve_references()
  user.eval_text_dir = str(texts)
  user.attentions = ("stickbreaking", "softmax_nope")
  records = lib.train_and_evaluate(user, workdir)
  assert [(r["attention"], r["split"]) for r in records] == [
      ("stickbreaking", "text:my_texts"), ("softmax_nope", "text:my_texts")]
  assert records[0]["books"] == 2
  assert os.path.exists(os.path.join(workdir, "eval_text", "my_texts", "position_loss.png"))
  assert sorted(os.listdir(os.path.join(workdir, "runs"))) == checkpoints
  short = tmp_path / "short"
  short.mkdir()
  (short / "note.txt").write_text("Too short for a window of 256 tokens.")
  user.eval_text_dir = str(short)
  with pytest.raises(ValueError, match="eval_text_dir=.*no document holds"):
    lib.train_and_evaluate(user, workdir)
  user.eval_text_dir = str(texts)
  untrained = user.copy_and_resolve_references()
  untrained.num_steps = 5
  with pytest.raises(ValueError, match="not trained to step 5"):
    lib.train_and_evaluate(untrained, workdir)


def test_chunked_position_loss_matches_the_models_own_logits():
  config = models.lm_config("tiny", vocab_size=64, attention="softmax_rope", num_layers=1,
                            d_model=32, num_heads=2, mlp_dim=64, softmax_implementation="xla")
  mesh = make_mesh(1, 1)
  with jax.set_mesh(mesh):
    model = models.DecoderLM(config, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, 64, (2, 65)).astype(np.int32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  losses = lib.make_position_loss(graphdef, rest, mesh, shardings, chunk=16)(
      params, jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                             batch_sharding(mesh)))
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p, rest)(t))(params, tokens[:, :-1])
  expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
  assert losses.shape == (2, 64)
  np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-5)
  _, sums = training.cross_entropy(logits, jnp.asarray(tokens[:, 1:]))
  np.testing.assert_allclose(np.sum(losses), sums["loss_sum"], rtol=1e-5)


def test_book_bootstrap_resamples_books():
  losses = np.array([[1.0, 1.0], [1.0, 1.0], [3.0, 3.0]])  # book 0: two windows, book 1: one
  stat = lib._bin_means([0, 2])
  estimate, low, high = lib.book_bootstrap(losses, np.array([0, 0, 1]), stat, 400, seed=0)
  np.testing.assert_allclose(estimate, [5 / 3])  # windows pooled
  assert low[0] == pytest.approx(1.0) and high[0] == pytest.approx(3.0)  # all-0 or all-1 draws
  one = lib.book_bootstrap(losses[:2], np.array([4, 4]), stat, 100, seed=0)
  np.testing.assert_allclose(one, [[1.0]] * 3)  # one book: no spread, whatever the windows


def test_configs_load():
  assert get_config("h200").train_len * get_config("h200").eval_len_multiple == 32768
  with pytest.raises(ValueError, match="variant"):
    get_config("tpu")


def test_bins_and_context_lengths():
  assert lib.position_bin_edges(2048, 32768) == [0, 2048, 4096, 8192, 16384, 32768]
  assert lib.context_lengths(32768, 2048) == [512, 1024, 2048, 4096, 8192, 16384, 32768]


@pytest.mark.parametrize("field, value, match", [
    ("attentions", ("softmax",), "config.attentions"),
    ("loss_chunk", 100, "loss_chunk"),
    ("corpus_archive", "/nonexistent.tar.xz", "corpus_archive"),
    ("eval_text_dir", "/nonexistent_dir", "eval_text_dir"),
    ("train_len", 0, "train_len"),
    ("mesh_shape", (1,), "mesh_shape"),
    ("mesh_shape", (1, 1, 64), "mesh_shape"),  # more devices than there are
])
def test_bad_config_is_rejected_before_any_work(tmp_path, field, value, match):
  config = tiny_config(tmp_path)
  config[field] = value
  with pytest.raises(ValueError, match=match):
    lib.train_and_evaluate(config, str(tmp_path / "work"))
  assert not os.path.exists(tmp_path / "work")


@pytest.mark.parametrize("mesh_shape", [(-1, 1), (1, 1, 2)])
def test_two_processes_match_one(tmp_path, mesh_shape):
  """The program as two ``jax.distributed`` processes of one CPU device each gives the records of
  one process on 2 devices, bit for bit (the same partitioned program; 2-way reductions add alike
  in any order): per-process training rows, scoring rows gathered into global batches, the data
  caches filled by process 0 first, the trained state gathered for the qk dump. With
  ``mesh_shape=(1, 1, 2)`` both train and score context-parallel (T over the 2 devices, across the
  processes) and match one device up to reduction order."""
  config = tiny_config(tmp_path)
  config.attentions = ("stickbreaking",)
  config.eval_test = False
  config.mesh_shape = mesh_shape
  overrides = {k: config[k] for k in ("corpus_archive", "corpus_sha256", "max_train_books",
                                      "vocab_size", "train_len", "batch_size", "num_steps",
                                      "log_every", "checkpoint_every", "max_eval_windows_per_book",
                                      "loss_chunk", "bootstrap_samples", "progress_bar",
                                      "qk_window_len", "eval_test", "mesh_shape")}
  config_file = tmp_path / "tiny_config.py"  # dict fields cannot be set from the command line
  config_file.write_text(
      "import importlib.util\n"
      "def get_config():\n"
      f"  spec = importlib.util.spec_from_file_location('c', {os.path.join(EXPERIMENTS, 'configs', 'length_extrapolation.py')!r})\n"
      "  module = importlib.util.module_from_spec(spec)\n"
      "  spec.loader.exec_module(module)\n"
      "  c = module.get_config('cpu')\n"
      f"  c.update({overrides!r})\n"
      f"  c.attentions, c.qk_layers = ('stickbreaking',), (0,)\n"
      f"  c.model_overrides = {dict(config.model_overrides)!r}\n"
      "  return c\n")
  run_as_one_and_two_processes(
      os.path.join(EXPERIMENTS, "length_extrapolation.py"), lambda name: [
          f"--config={config_file}", f"--workdir={tmp_path / name}",
          f"--config.data_dir={tmp_path / ('data_' + name)}"], tmp_path)
  timing = ("tokens_per_second",)
  one, two = ([{k: v for k, v in r.items() if k not in timing}
               for r in json.loads((tmp_path / name / "summary.json").read_text())]
              for name in ("one", "two"))
  assert len(one) == 1 and one[0]["windows"] > 0 and np.isfinite(one[0]["mean_loss"])
  assert two == one
  if len(mesh_shape) == 3:  # against one device, in this process
    config.mesh_shape = (1, 1)
    config.data_dir = str(tmp_path / "data_one")
    single = lib.train_and_evaluate(config, str(tmp_path / "single"))
    assert single[0]["windows"] == one[0]["windows"]
    np.testing.assert_allclose(one[0]["mean_loss"], single[0]["mean_loss"], rtol=1e-5)
  qk = [np.load(tmp_path / name / "qk_stickbreaking.npz") for name in ("one", "two")]
  for name in ("query", "key"):
    assert np.isfinite(qk[0][name]).all()
    np.testing.assert_array_equal(qk[1][name], qk[0][name])
