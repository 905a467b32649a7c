"""Context parallelism (sbjax.context_parallel): the cross-chunk mode of every path, and the ring on
8 simulated host devices (tests/context_parallel_worker.py, one subprocess for all its checks:
JAX must start with ``--xla_force_host_platform_device_count=8``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from helpers import Shape, random_inputs
from sbjax import context_parallel, parallel, reference, scan
from test_pallas_triton import lower_for_cuda

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "context_parallel_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))
# Compile-time savers for the worker's CPU programs (about halves its time on 2 cores).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_eight_device_checks(tmp_path):
  """Forward and gradients of the ring against the float64 single-device op for context 2, 4, 8
  (meshes data x model x context, data x context, context; T=44 padded for 4 and 8; segment ids,
  forget gate, GQA; XLA, scan and interpreted Pallas chunks), exact skipping of used-up sticks,
  argument errors, and the tiny LM's train steps (stick-breaking and RoPE softmax) against one
  device."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = " ".join(
      [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", FAST_COMPILE])
  out = tmp_path / "results.json"
  proc = subprocess.run([sys.executable, WORKER, str(out)], env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert len(results) == 8, results.keys()
  failed = {name: message for name, message in results.items() if message != "ok"}
  assert not failed, "\n\n".join(f"{name}:\n{message}" for name, message in failed.items())


@pytest.mark.parametrize("implementation", ["xla", "scan"])
def test_cross_chunk_mode_is_the_combine_of_its_halves(implementation, x64):
  """A query chunk against keys [0, 2S) (fully visible) equals the combine of [S, 2S) (near) and
  [0, S) (far): o = o_near + rem_near o_far, rem = rem_near rem_far; and against the definition
  (keys after the queries in a causal call: the same weights)."""
  s = Shape(2, 12, 4, 2, 8)
  q, _, _, _ = random_inputs(0, s, np.float64)
  _, k, v, seg = random_inputs(1, Shape(2, 24, 4, 2, 8), np.float64, segments=True)
  gate = np.random.default_rng(2).normal(size=(2, 24, 2))
  q, k, v, gate = map(jnp.asarray, (q, k, v, gate))
  q_seg = seg[:, 12:]
  chunk = lambda k, v, k_seg, g: context_parallel.chunk_attention(
      q, k, v, causal=False, scale=0.3, segment_ids=q_seg, key_segment_ids=k_seg, forget_gate=g,
      implementation="xla")
  near, rem_near = chunk(k[:, 12:], v[:, 12:], seg[:, 12:], gate[:, 12:])
  far, rem_far = chunk(k[:, :12], v[:, :12], seg[:, :12], gate[:, :12])
  fn = reference if implementation == "xla" else scan
  whole, rem = fn.stick_breaking_attention(q, k, v, 0.3, q_seg, gate, causal=False,
                                           key_segment_ids=seg)
  np.testing.assert_allclose(whole, near + rem_near[..., None] * far, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(rem, rem_near * rem_far, rtol=1e-12, atol=1e-300)
  # The definition: queries placed after all 24 keys see every one of them, nearest first (the
  # query rows' own keys are gated off: g = -inf takes nothing and leaves the stick unchanged).
  qkv = lambda x, y: jnp.concatenate([x, y], axis=1)
  causal, causal_rem = reference.stick_breaking_attention(
      qkv(jnp.zeros((2, 24, 4, 8)), q), qkv(k, k[:, :12]),
      qkv(v, v[:, :12]), 0.3, qkv(seg, q_seg), qkv(gate, jnp.full((2, 12, 2), -jnp.inf)))
  np.testing.assert_allclose(whole, causal[:, 24:], rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(rem, causal_rem[:, 24:], rtol=1e-12, atol=1e-300)


def test_cross_chunk_kernels_lower_to_triton():
  sd = jax.ShapeDtypeStruct
  b, t, n, k, h = 2, 300, 4, 2, 64

  def loss(q, k, v, q_seg, k_seg, gate):
    out, rem = context_parallel.chunk_attention(
        q, k, v, causal=False, segment_ids=q_seg, key_segment_ids=k_seg, forget_gate=gate,
        implementation="pallas")
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(rem)

  args = (sd((b, t, n, h), jnp.bfloat16), sd((b, t, k, h), jnp.bfloat16),
          sd((b, t, k, h), jnp.bfloat16), sd((b, t), jnp.int32), sd((b, t), jnp.int32),
          sd((b, t, k), jnp.float32))
  grad = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 5)), *args)
  assert len(re.findall(r"__gpu\$xla\.gpu\.triton", grad)) == 3
  for name in ("stick_breaking_fwd", "stick_breaking_bwd_dq", "stick_breaking_bwd_dkv"):
    assert re.search(rf'name = "{name}"', grad), name


def test_chunk_attention_errors_name_the_argument():
  q, k, v, seg = random_inputs(0, Shape(1, 16, 2, 1, 8), jnp.float32, segments=True)
  with pytest.raises(ValueError, match="key_segment_ids"):
    context_parallel.chunk_attention(q, k, v, causal=False, segment_ids=seg)
  with pytest.raises(ValueError, match="key_segment_ids"):
    context_parallel.chunk_attention(q, k, v, causal=True, segment_ids=seg, key_segment_ids=seg)
  with pytest.raises(ValueError, match="key_segment_ids must be integers of shape"):
    context_parallel.chunk_attention(q, k, v, causal=False, segment_ids=seg,
                                     key_segment_ids=seg[:, :8])
  with pytest.raises(ValueError, match="implementation"):
    context_parallel.stick_breaking_attention(q, k, v, implementation="cudnn")


def test_ring_lowers_to_triton_for_two_gpus():
  """The whole context-parallel gradient on an abstract mesh of 2 H200s (context=2) lowers for
  CUDA: the kernels in both modes (forward, dq, dk/dv for the own and the earlier pieces of both
  zig-zag pieces: 12 Triton calls) and the collectives (query pieces by collective permutes, K/V
  all-gathered, their gradients reduce-scattered)."""
  mesh = AbstractMesh((1, 1, 2), (parallel.DATA, parallel.MODEL, parallel.CONTEXT),
                      axis_types=(AxisType.Auto,) * 3,
                      abstract_device=AbstractDevice("NVIDIA H200", None, "cuda"))
  sd = jax.ShapeDtypeStruct

  def loss(q, k, v, seg):
    out, rem = context_parallel.stick_breaking_attention(
        q, k, v, segment_ids=seg, return_remainder=True, implementation="pallas_triton")
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(rem)

  args = (sd((1, 256, 4, 64), jnp.bfloat16), sd((1, 256, 2, 64), jnp.bfloat16),
          sd((1, 256, 2, 64), jnp.bfloat16), sd((1, 256), jnp.int32))
  with jax.sharding.use_abstract_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"__gpu\$xla\.gpu\.triton", text)) == 12
  for op in ("all_gather", "collective_permute", "reduce_scatter"):
    assert op in text, op
