"""Subprocess entry point of tests/test_context_parallel.py: every check that needs 8 host devices,
in one process (one JAX start, each mesh compiled once).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/context_parallel_worker.py OUT.json [CHECK ...]

Writes ``{check: "ok" | the failure's message}`` to OUT.json (all checks when none is named).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import SMALL_BLOCKS  # noqa: E402
from sbjax import context_parallel, parallel, testing, training  # noqa: E402
from sbjax.models import DecoderLM, lm_config  # noqa: E402
from sbjax.testing import Shape, random_inputs, rel_rms  # noqa: E402

SCALE = 0.25
SHAPE = Shape(2, 44, 4, 2, 8)  # one shape for the rings of the XLA and scan paths: one oracle


def _inputs(shape, seed=0):
  """float32 q, k, v, sorted segment ids (3 segments: some cross the chunk boundaries), forget-gate
  logits and cotangents."""
  q, k, v, seg = random_inputs(seed, shape, jnp.float32, segments=True)
  rng = np.random.default_rng(seed + 1)
  gate = jnp.asarray(rng.normal(size=(shape.b, shape.t, shape.k)) + 1.0, jnp.float32)
  d_out = jnp.asarray(rng.normal(size=(shape.b, shape.t, shape.n, shape.hv or shape.h)), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=(shape.b, shape.t, shape.n)), jnp.float32)
  return q, k, v, seg, gate, d_out, d_rem


def _ring_vs_float64(mesh_shape, shape, *, attend_current=False, **options):
  """Forward and gradients (q, k, v, scale, forget gate) of the context-parallel op on a
  ``(data, model, context)`` mesh against the float64 single-device op, by the tolerance rule."""
  q, k, v, seg, gate, d_out, d_rem = _inputs(shape)
  mesh = parallel.make_mesh(*mesh_shape)

  def fn(q, k, v, s, g):
    return context_parallel.stick_breaking_attention(
        q, k, v, scale=s, segment_ids=seg, forget_gate=g, attend_current=attend_current,
        return_remainder=True, **options)

  with jax.set_mesh(mesh):
    got = jax.jit(lambda *a: testing.gradients(fn, *a))(q, k, v, jnp.float32(SCALE), d_out, d_rem,
                                                        gate)
  want = testing.float64_gradients(q, k, v, seg, SCALE, attend_current, d_out, d_rem, gate)
  same = testing.same_precision_gradients(q, k, v, seg, SCALE, attend_current, d_out, d_rem, gate)
  testing.assert_gradients_within_tolerance(got, want, same, jnp.float32)


def check_ring_data2_model2_context2():
  # T=44: 4 pieces of 11; GQA (N=4, K=2) with heads over "model", batch over "data".
  _ring_vs_float64((2, 2, 2), SHAPE, implementation="xla")


def check_ring_data2_context4():
  # T=44 is not a multiple of 2C=8: padded at the end.
  _ring_vs_float64((2, 1, 4), SHAPE, implementation="xla")


def check_ring_context8():
  # T=44, 2C=16: 4 padded positions; the scan path per chunk.
  _ring_vs_float64((1, 1, 8), SHAPE, implementation="scan")


def check_ring_pallas_context2():
  # The interpreted Pallas kernels, causal and cross-chunk (forward, dq, dk/dv) with segments, the
  # forget gate and MQA: 4 pieces of 20 rows with blocks of 16 and 32, partial in both modes.
  _ring_vs_float64((1, 1, 2), Shape(1, 80, 2, 1, 16), implementation="pallas", interpret=True,
                   block_sizes=SMALL_BLOCKS)


def check_skips_used_up_chunks():
  """Once every query of a piece has rem == 0, the farther pieces are not visited: their values
  hold NaN, which a visit would spread (rem * NaN); the output equals the op's with them zeroed."""
  shape = Shape(1, 32, 2, 1, 8)
  q, k, v, _ = random_inputs(3, shape, jnp.float32)
  k = 4.0 * k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  q = 100.0 * jnp.repeat(k, shape.n // shape.k, axis=2)
  # scale * q_j . k_j = 1600 / sqrt(8) at every position: with attend_current each query's own key takes the
  # whole stick (rem exactly 0 in float32) before any farther key.
  piece = shape.t // 8  # context 4: 8 pieces
  v_nan = v.at[:, :piece].set(jnp.nan)  # piece 0: a far piece for every other piece's queries
  mesh = parallel.make_mesh(1, 1, 4)
  op = lambda v: context_parallel.stick_breaking_attention(
      q, k, v, attend_current=True, return_remainder=True, implementation="xla")
  with jax.set_mesh(mesh):
    out, rem = jax.jit(op)(v_nan)
  want, want_rem = context_parallel.chunk_attention(
      q, k, v.at[:, :piece].set(0.0), causal=True, attend_current=True, implementation="xla")
  assert np.all(np.asarray(want_rem) == 0), "the inputs must use up every stick"
  np.testing.assert_array_equal(np.asarray(out[:, piece:]), np.asarray(want[:, piece:]))
  np.testing.assert_array_equal(np.asarray(rem), np.asarray(want_rem))
  # The dense walk (BlockSizes(skip_used_stick=False), interpreted kernels) visits every piece.
  dense = lambda v: context_parallel.stick_breaking_attention(
      q, k, v, attend_current=True, implementation="pallas", interpret=True,
      block_sizes=dataclasses.replace(SMALL_BLOCKS, skip_used_stick=False))
  with jax.set_mesh(mesh):
    out = np.asarray(jax.jit(dense)(v_nan))
  assert np.isnan(out[:, piece:]).all(), "a far piece was skipped in the dense walk"


def check_errors_name_the_argument():
  shape = Shape(2, 16, 2, 1, 8)
  q, k, v, _ = random_inputs(0, shape, jnp.float32)
  with jax.set_mesh(parallel.make_mesh(1, 1, 4)):
    for call, match in [
        (lambda: context_parallel.stick_breaking_attention(q, k, v, axis_name="seq"), "axis_name"),
        (lambda: context_parallel.stick_breaking_attention(q, k[:, :8], v), "query, key and value"),
    ]:
      try:
        call()
      except ValueError as e:
        assert match in str(e), str(e)
      else:
        raise AssertionError(f"no ValueError naming {match}")
  with jax.set_mesh(parallel.make_mesh(4, 1, 2)):
    try:
      context_parallel.stick_breaking_attention(q, k, v)
    except ValueError as e:
      assert "batch size B=2" in str(e), str(e)
    else:
      raise AssertionError("no ValueError naming the batch size")
  assert parallel.batch_sharding(parallel.make_mesh(2, 1, 4)).spec == jax.P("data", "context")
  assert parallel.batch_sharding(parallel.make_mesh(2, 4, 1)).spec == jax.P("data")


def _lm_step(config, mesh_shape, num_steps=2):
  """Losses and final parameters of a tiny DecoderLM trained ``num_steps`` on ``mesh_shape``
  (packed rows: segment ids)."""
  tx = training.make_optimizer(training.TrainConfig(num_steps=10, warmup_steps=0,
                                                    learning_rate=1e-2))
  mesh = parallel.make_mesh(*mesh_shape)
  model = DecoderLM(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  graphdef, rest, state, shardings = training.init_train_state(model, tx, mesh)
  step = training.make_train_step(graphdef, rest, tx, mesh, shardings)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(num_steps):
    tokens = rng.integers(0, config.vocab_size, size=(4, 33)).astype(np.int32)
    segments = np.sort(rng.integers(0, 2, size=(4, 32)), axis=1).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}
    state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(jax.tree.leaves(state.params))


def _lm_matches_one_device(config, mesh_shape):
  losses, params = _lm_step(config, mesh_shape)
  losses_one, params_one = _lm_step(config, (1, 1, 1))
  np.testing.assert_allclose(losses, losses_one, rtol=1e-5)
  err = rel_rms(params, params_one)
  assert err < 1e-4, f"parameters after 2 steps: rel RMS {err:.3g} against one device"


def check_lm_train_step_stickbreaking_context4():
  _lm_matches_one_device(lm_config("tiny", num_layers=1, implementation="xla", num_kv_heads=2,
                                   forget_gate=True, remainder="current", head_norm=True), (2, 1, 4))


def check_lm_train_step_softmax_model2_context2():
  # RoPE at global positions: each shard's queries rotated where they sit in the sequence.
  _lm_matches_one_device(lm_config("tiny", num_layers=1, attention="softmax_rope",
                                   softmax_implementation="xla", num_kv_heads=2), (1, 2, 2))


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def main(out_path, names):
  assert jax.device_count() == 8, f"needs 8 host devices, got {jax.device_count()}"
  results = {}
  for name in names or CHECKS:
    start = time.perf_counter()
    try:
      CHECKS[name]()
      results[name] = "ok"
      print(f"{name}: ok in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    except Exception:  # reported to the test, which fails with the message
      results[name] = traceback.format_exc()[-3000:]
  with open(out_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
