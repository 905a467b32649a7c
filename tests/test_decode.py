"""Decoding: the decode op against the float64 definition, skipping, the cached modules, generate."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sbjax
from sbjax import reference
from sbjax.kernels import pallas_triton_decode
from helpers import assert_within_tolerance, rel_rms, stick_loop, tiny_length_extrapolation_run


def _decode_inputs(seed, b, s, q_len, n, k, h, hv, dtype, *, gate=False, logit_scale=1.0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, q_len, n, h)) * logit_scale, dtype)
  kc = jnp.asarray(rng.normal(size=(b, s, k, h)), dtype)
  vc = jnp.asarray(rng.normal(size=(b, s, k, hv)), dtype)
  g = jnp.asarray(rng.normal(size=(b, s, k)) * 2, jnp.float32) if gate else None
  cache_len = jnp.asarray(rng.integers(q_len, s + 1, size=b), jnp.int32)
  return q, kc, vc, g, cache_len


_same_precision = jax.jit(reference.stick_breaking_attention,
                          static_argnames=("attend_current", "dtype"))


def _prefix_oracle(q, kc, vc, g, cache_len, scale, attend_current, dtype=None):
  """The new queries placed at the end of each row's prefix ``[:cache_len]`` of a full-length
  query array, the keys past it in another segment (invisible), attended by the float64 loop
  (``dtype=None``) or by the dense reference with its math in ``dtype``."""
  b, q_len = q.shape[:2]
  s = kc.shape[1]
  lengths = np.asarray(cache_len)
  rows = np.arange(b)[:, None]
  at = lengths[:, None] - q_len + np.arange(q_len)  # [B, Q] the queries' positions
  q_full = np.zeros((b, s, *q.shape[2:]), np.float64)
  q_full[rows, at] = np.asarray(q, np.float64)
  seg = (np.arange(s)[None, :] >= lengths[:, None]).astype(np.int32)  # [B, S]
  if dtype is None:
    out, rem = stick_loop(q_full, kc, vc, scale, seg, attend_current=attend_current, forget_gate=g)
  else:
    out, rem = _same_precision(jnp.asarray(q_full, dtype), kc, vc, scale, jnp.asarray(seg), g,
                               attend_current=attend_current, dtype=dtype)
  return np.asarray(out, np.float64)[rows, at], np.asarray(rem, np.float64)[rows, at]


@functools.partial(jax.jit, static_argnames=("attend_current", "chunk_size", "skip_tolerance"))
def _decode(q, kc, vc, cache_len, g, *, attend_current, chunk_size, skip_tolerance=0.0):
  return sbjax.stick_breaking_decode(
      q, kc, vc, cache_len, forget_gate_cache=g, attend_current=attend_current,
      chunk_size=chunk_size, skip_tolerance=skip_tolerance, return_remainder=True,
      return_keys_read=True)


# Chunk sizes 1 (one key per chunk), odd ones that split rows at different offsets, S (one chunk).
@pytest.mark.parametrize("q_len,gate,attend_current,chunk_size,dtype", [
    (1, False, False, 5, jnp.float32),
    (1, True, True, 1, jnp.float32),
    (3, False, True, 7, jnp.float32),
    (3, True, False, 24, jnp.float32),
    (2, True, False, 3, jnp.bfloat16),
])
def test_decode_matches_float64_definition(q_len, gate, attend_current, chunk_size, dtype):
  """Random cache lengths per row, GQA (N=4, K=2), Hv != H, against the loop on each prefix."""
  q, kc, vc, g, cache_len = _decode_inputs(
      chunk_size, b=3, s=24, q_len=q_len, n=4, k=2, h=8, hv=6, dtype=dtype, gate=gate)
  scale = 8 ** -0.5
  out, rem, keys_read = _decode(q, kc, vc, cache_len, g, attend_current=attend_current,
                                chunk_size=chunk_size)
  assert out.shape == (3, q_len, 4, 6) and out.dtype == dtype and rem.shape == (3, q_len, 4)
  assert np.isfinite(np.asarray(out, np.float64)).all() and np.isfinite(np.asarray(rem)).all()
  want_out, want_rem = _prefix_oracle(q, kc, vc, g, cache_len, scale, attend_current)
  same_out, same_rem = _prefix_oracle(q, kc, vc, g, cache_len, scale, attend_current, dtype=dtype)
  for name, got, want, same in (("out", out, want_out, same_out), ("rem", rem, want_rem, same_rem)):
    assert_within_tolerance(rel_rms(got, want), rel_rms(same, want), dtype, name)
  # Standard-normal logits never use up a stick of 24 keys: every key before cache_len is read.
  np.testing.assert_array_equal(np.asarray(keys_read), np.asarray(cache_len))


_SMALL_DECODE_BLOCKS = sbjax.DecodeBlockSizes(chunk_size=16, block_k=16)


@functools.partial(jax.jit, static_argnames=("attend_current", "skip"))
def _pallas_decode(q, kc, vc, cache_len, g, *, attend_current, skip=True):
  return sbjax.stick_breaking_decode(
      q, kc, vc, cache_len, forget_gate_cache=g, attend_current=attend_current,
      return_remainder=True, implementation="pallas", interpret=True,
      block_sizes=_SMALL_DECODE_BLOCKS, skip_tolerance=0.0 if skip else None)


@pytest.mark.parametrize("q_len,gate,attend_current,dtype", [
    (1, True, False, jnp.float32), (3, False, True, jnp.float32), (2, True, False, jnp.bfloat16)])
def test_pallas_decode_kernel_matches_float64_definition(q_len, gate, attend_current, dtype):
  """The split-K kernel, interpreted: S=40 in chunks of 16 (a partial last chunk), GQA, H=8 and
  Hv=6 (padded tiles), random cache lengths."""
  q, kc, vc, g, cache_len = _decode_inputs(
      q_len, b=3, s=40, q_len=q_len, n=4, k=2, h=8, hv=6, dtype=dtype, gate=gate)
  out, rem = _pallas_decode(q, kc, vc, cache_len, g, attend_current=attend_current)
  assert out.shape == (3, q_len, 4, 6) and out.dtype == dtype
  assert np.isfinite(np.asarray(out, np.float64)).all() and np.isfinite(np.asarray(rem)).all()
  scale = 8 ** -0.5
  want_out, want_rem = _prefix_oracle(q, kc, vc, g, cache_len, scale, attend_current)
  same_out, same_rem = _prefix_oracle(q, kc, vc, g, cache_len, scale, attend_current, dtype=dtype)
  for name, got, want, same in (("out", out, want_out, same_out), ("rem", rem, want_rem, same_rem)):
    assert_within_tolerance(rel_rms(got, want), rel_rms(same, want), dtype, name)


@pytest.mark.parametrize("s,skip_tolerance,names", [
    (1000, 0.0, ["stick_breaking_decode"]),  # 2 chunks of 512: the first launch reads them all
    (4096, 0.0, ["stick_breaking_decode", "stick_breaking_decode_far"]),
    (4096, None, ["stick_breaking_decode"]),  # no skipping: one launch
])
def test_pallas_decode_kernel_lowers_to_triton_calls(s, skip_tolerance, names):
  """Lowered for an H200 on any machine (as tests/test_pallas_triton.py), bf16 with the gate."""
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType  # pylint: disable=g-import-not-at-top
  h200 = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                      abstract_device=AbstractDevice("NVIDIA H200", None, "cuda"))

  def lower_for_cuda(fn, *shapes):
    with jax.sharding.use_abstract_mesh(h200):
      return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()

  sd = jax.ShapeDtypeStruct
  fn = lambda q, k, v, n, g: sbjax.stick_breaking_decode(
      q, k, v, n, forget_gate_cache=g, implementation="pallas", skip_tolerance=skip_tolerance)
  text = lower_for_cuda(fn, sd((4, 1, 12, 128), jnp.bfloat16), sd((4, s, 4, 128), jnp.bfloat16),
                        sd((4, s, 4, 128), jnp.bfloat16), sd((4,), jnp.int32),
                        sd((4, s, 4), jnp.float32))
  assert len(re.findall(r"__gpu\$xla\.gpu\.triton", text)) == len(names)
  assert re.findall(r'name = "(stick_breaking_decode\w*)"', text) == names


def _saturating_inputs(seed, s=64, shift=6.0):
  """Keys aligned with the query (logits ~ shift + N(0, 1)): sticks run out within a few keys."""
  rng = np.random.default_rng(seed)
  h = 16
  q = rng.normal(size=(2, 1, 2, h))
  kc = rng.normal(size=(2, s, 2, h)) * 0.3
  kc += q[:, :1] / np.linalg.norm(q[:, :1], axis=-1, keepdims=True) * shift * h ** 0.25
  vc = rng.normal(size=(2, s, 2, h))
  return (jnp.asarray(q, jnp.float32), jnp.asarray(kc, jnp.float32), jnp.asarray(vc, jnp.float32),
          jnp.asarray([s, s - 5], jnp.int32))


def test_exact_skipping_is_bitwise_the_full_walk_and_reads_less():
  q, kc, vc, cache_len = _saturating_inputs(0, shift=20.0)
  skip = _decode(q, kc, vc, cache_len, None, attend_current=False, chunk_size=8)
  full = _decode(q, kc, vc, cache_len, None, attend_current=False, chunk_size=8,
                 skip_tolerance=None)
  assert np.isfinite(np.asarray(skip[0])).all()
  np.testing.assert_array_equal(np.asarray(skip[0]), np.asarray(full[0]))
  np.testing.assert_array_equal(np.asarray(skip[1]), np.asarray(full[1]))
  np.testing.assert_array_equal(np.asarray(full[2]), np.asarray(cache_len))
  assert (np.asarray(skip[2]) < np.asarray(cache_len) // 2).all(), skip[2]
  # The kernel's in-chunk skipping is exact too, and agrees with the portable path.
  kernel_skip = _pallas_decode(q, kc, vc, cache_len, None, attend_current=False)
  kernel_full = _pallas_decode(q, kc, vc, cache_len, None, attend_current=False, skip=False)
  np.testing.assert_array_equal(np.asarray(kernel_skip[0]), np.asarray(kernel_full[0]))
  np.testing.assert_allclose(np.asarray(kernel_skip[0]), np.asarray(full[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tolerance", [1e-2, 1e-4])
def test_skip_tolerance_error_bound(tolerance):
  """``|out - out64| <= skip_tolerance * max|v|`` (plus fp32 rounding), and it does skip."""
  q, kc, vc, cache_len = _saturating_inputs(1, shift=2.0)
  out, rem, keys_read = _decode(q, kc, vc, cache_len, None, attend_current=False, chunk_size=4,
                                skip_tolerance=tolerance)
  want_out, _ = _prefix_oracle(q, kc, vc, None, cache_len, 16 ** -0.5, False)
  assert np.isfinite(np.asarray(out)).all()
  err = np.abs(np.asarray(out, np.float64) - want_out).max()
  assert err <= tolerance * np.abs(np.asarray(vc)).max() + 1e-5, err
  assert (np.asarray(keys_read) < np.asarray(cache_len)).all(), keys_read
  assert (np.asarray(rem) < tolerance).all()


@functools.partial(jax.jit, static_argnames=("block_sizes", "skip_tolerance"))
def _kernel_decode(q, kc, vc, cache_len, *, block_sizes, skip_tolerance=0.0):
  """The kernel's own entry, interpreted: it also takes ``skip_tolerance > 0`` and returns
  ``keys_read [B, K]``."""
  return pallas_triton_decode.decode(
      q, kc, vc, cache_len, 16 ** -0.5, attend_current=False, block_sizes=block_sizes,
      skip_tolerance=skip_tolerance, return_keys_read=True, interpret=True)


def _near_keys(cache_len, chunk, near):
  """Keys in each row's ``near`` nearest chunks (chunks start at multiples of ``chunk``)."""
  last_start = (np.asarray(cache_len) - 1) // chunk * chunk
  return np.minimum(np.asarray(cache_len), np.asarray(cache_len) - last_start + (near - 1) * chunk)


@pytest.mark.parametrize("chunk_size,per_check", [(16, 1), (64, 3)])
def test_kernel_cross_chunk_skipping_is_bitwise_the_dense_walk(chunk_size, per_check):
  """kv head 0 uses its stick up within a key, kv head 1 never: head 0 reads only the first
  launch's chunks (and, within them, the nearest blocks), head 1 every key, and the output keeps
  every bit of the dense walk. S=256 in 4 or 16 chunks, rows of 256 and 251 keys."""
  q, kc, vc, _ = _saturating_inputs(0, s=256, shift=20.0)
  q1 = np.asarray(q)[:, 0, 1]  # [B, H]
  far = -24 * q1 / (q1 ** 2).sum(-1, keepdims=True)  # q . k = -24: logit -6, beta ~ 2.5e-3
  noise = np.random.default_rng(1).normal(size=(2, 256, 16)) * 0.1
  kc = kc.at[:, :, 1].set(jnp.asarray(far[:, None] + noise, jnp.float32))
  cache_len = jnp.asarray([256, 251], jnp.int32)
  blocks = sbjax.DecodeBlockSizes(chunk_size=chunk_size, block_k=16, num_near_chunks=2,
                                  num_blocks_per_check=per_check)
  skip = _kernel_decode(q, kc, vc, cache_len, block_sizes=blocks)
  dense = _kernel_decode(q, kc, vc, cache_len, block_sizes=dataclasses.replace(
      blocks, skip_used_stick=False))
  assert np.isfinite(np.asarray(skip[0])).all()
  for got, want in zip(skip[:2], dense[:2]):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert (np.asarray(skip[1])[:, 0, 0] == 0).all() and (np.asarray(skip[1])[:, 0, 1] > 0).all()
  np.testing.assert_array_equal(np.asarray(dense[2]), np.stack([cache_len] * 2, 1))
  np.testing.assert_array_equal(np.asarray(skip[2])[:, 1], cache_len)
  # Head 0: in each of the first launch's two chunks, the blocks of 16 keys up to the first check
  # of its stick; the 251-key row's nearest chunk ends in a block of 11 keys.
  want = [2 * per_check * 16, 11 + (2 * per_check - 1) * 16]
  np.testing.assert_array_equal(np.asarray(skip[2])[:, 0], want)


@pytest.mark.parametrize("tolerance", [1e-1, 1e-2, 1e-5])
def test_kernel_skip_tolerance_leaves_out_far_chunks_within_the_bound(tolerance):
  """Logits ~ -1.7: after the first launch's 2 chunks of 16 keys each row has a stick of 2e-4 to
  3e-2 left, so 1e-1 skips every far chunk, 1e-2 some, 1e-5 none (then the exact result)."""
  q, kc, vc, cache_len = _saturating_inputs(1, shift=-1.0)
  blocks = sbjax.DecodeBlockSizes(chunk_size=16, block_k=16, num_near_chunks=2)
  out, rem, keys_read = _kernel_decode(q, kc, vc, cache_len, block_sizes=blocks,
                                       skip_tolerance=tolerance)
  exact = _kernel_decode(q, kc, vc, cache_len, block_sizes=blocks)
  want_out, want_rem = _prefix_oracle(q, kc, vc, None, cache_len, 16 ** -0.5, False)
  assert np.isfinite(np.asarray(out)).all()
  err = np.abs(np.asarray(out, np.float64) - want_out).max()
  assert err <= tolerance * np.abs(np.asarray(vc)).max() + 1e-5, err
  rem, keys_read = np.asarray(rem)[:, 0], np.asarray(keys_read)  # [B, N=K], [B, K]
  near = np.stack([_near_keys(cache_len, 16, 2)] * 2, 1)
  skipped = keys_read == near
  np.testing.assert_array_equal(keys_read[~skipped], np.stack([cache_len] * 2, 1)[~skipped])
  assert (rem[skipped] < tolerance).all() and (rem[~skipped] < want_rem[:, 0][~skipped] * 1.01).all()
  assert (rem >= want_rem[:, 0] * 0.99).all()  # the stick of the keys read: an upper bound
  if tolerance == 1e-1:
    assert skipped.all()
  elif tolerance == 1e-2:
    assert skipped.any() and not skipped.all()
  else:
    assert not skipped.any()
    for got, want in zip((out, rem), exact[:2]):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[:, 0] if got is rem else
                                    np.asarray(want))


def test_empty_prefix_and_batch_rows_of_different_lengths():
  """A row whose only key is the new token's own sees nothing without attend_current."""
  q, kc, vc, _, _ = _decode_inputs(3, b=2, s=8, q_len=1, n=2, k=2, h=4, hv=4, dtype=jnp.float32)
  out, rem = sbjax.stick_breaking_decode(q, kc, vc, jnp.asarray([1, 8]), return_remainder=True)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  np.testing.assert_array_equal(np.asarray(rem[0]), 1.0)
  assert (np.asarray(rem[1]) < 1).all()


@pytest.mark.parametrize("change,match", [
    (dict(cache_len=[3, 4]), "cache_len must be an integer array"),
    (dict(cache_len=jnp.asarray([3.0, 4.0])), "cache_len must be integers"),
    (dict(cache_len=jnp.asarray([3, 9])), r"cache_len must lie in \[Q, S\]=\[1, 8\]"),
    (dict(cache_len=jnp.asarray([0, 4])), r"cache_len must lie in"),
    (dict(key_cache=jnp.zeros((2, 8, 3, 4))), "key_cache"),
    (dict(value_cache=jnp.zeros((2, 7, 2, 4))), "value_cache"),
    (dict(query=jnp.zeros((2, 9, 2, 4))), "at most S=8"),
    (dict(forget_gate_cache=jnp.zeros((2, 8, 1))), "forget_gate_cache"),
    (dict(implementation="scan"), "implementation"),
    (dict(interpret=True), "interpret applies to implementation='pallas' only"),
    (dict(implementation="pallas", interpret=True, chunk_size=4), "chunk_size applies"),
    (dict(implementation="pallas"), "needs an NVIDIA GPU or interpret=True"),
    (dict(block_sizes=(16, 16)), "block_sizes must be a sbjax.DecodeBlockSizes"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(skip_tolerance=1.5), "skip_tolerance"),
])
def test_bad_decode_arguments_are_named(change, match):
  args = dict(query=jnp.zeros((2, 1, 2, 4)), key_cache=jnp.zeros((2, 8, 2, 4)),
              value_cache=jnp.zeros((2, 8, 2, 4)), cache_len=jnp.asarray([3, 4]))
  args.update(change)
  with pytest.raises((ValueError, TypeError), match=match):
    sbjax.stick_breaking_decode(**args)


@pytest.mark.parametrize("fields,match", [
    (dict(block_k=48), r"DecodeBlockSizes.block_k must be a power of two >= 16, got 48"),
    (dict(num_warps=3), r"DecodeBlockSizes.num_warps must be a power of two, got 3"),
    (dict(num_stages=0), r"DecodeBlockSizes.num_stages must be a positive int, got 0"),
    (dict(skip_used_stick=1), r"DecodeBlockSizes.skip_used_stick must be a bool, got 1"),
    (dict(chunk_size=40, block_k=16), r"chunk_size must be a positive multiple of block_k=16"),
    (dict(num_near_chunks=0), r"DecodeBlockSizes.num_near_chunks must be a positive int, got 0"),
    (dict(num_blocks_per_check=1.5), r"DecodeBlockSizes.num_blocks_per_check must be a positive"),
])
def test_bad_decode_block_sizes_are_named(fields, match):
  with pytest.raises(ValueError, match=match):
    sbjax.DecodeBlockSizes(**fields)


# --- The modules: prefill, then one-token steps, against the full forward --------------------

def _module(name, **options):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sbjax.nn import make_attention  # pylint: disable=g-import-not-at-top
  if name == "stickbreaking-pallas":  # the training and decode kernels, interpreted
    name, options = "stickbreaking", dict(implementation="pallas", interpret=True, **options)
  if name == "stickbreaking":
    options = dict(forget_gate=True, remainder="current", **{"implementation": "xla", **options})
  # RBG keys: threefry's initialisers take seconds to compile on a CPU.
  return make_attention(name, 16, 4, num_kv_heads=2, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
                        **options)


@functools.cache
def _jitted_step():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.jit(lambda m, y: m(y, decode=True))


def _step(module, x):
  return _jitted_step()(module, x)


@pytest.mark.parametrize("name", ["stickbreaking", "stickbreaking-pallas", "softmax_rope",
                                  "softmax_nope"])
def test_module_decode_matches_full_forward_at_every_position(name):
  """Right-padded prompts of lengths 4 and 2 prefilled in one call, then one token per step
  (under jit: a traced index); every position against the float64 full forward."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  module = _module(name)
  x = jax.random.normal(jax.random.key(1), (2, 9, 16), jnp.float32)
  forward = nnx.jit(lambda m, y: m(y))
  full32 = forward(module, x)
  oracle = _module(name.removesuffix("-pallas"))  # the same parameters, the dense op in float64
  with jax.enable_x64(True):
    full64 = np.asarray(forward(oracle, jnp.asarray(np.asarray(x), jnp.float64)))
  lengths = np.asarray([4, 2])
  module.init_cache((2, 12))
  prefill = nnx.jit(lambda m, y, n: m(y, decode=True, prompt_lengths=n))(
      module, x[:, :4], jnp.asarray(lengths))
  got = [[prefill[row, t] for t in range(length)] for row, length in enumerate(lengths)]
  rows = np.arange(2)
  for step in range(9 - lengths.min()):
    at = np.minimum(lengths + step, 8)  # row 0 finishes first, then repeats its last token
    y = _step(module, x[rows, at][:, None])
    for row in rows:
      if lengths[row] + step <= 8:
        got[row].append(y[row, 0])
  np.testing.assert_array_equal(np.asarray(module.cache_index[...]), [11, 9])
  got = np.stack([np.stack(g) for g in got])  # [B, T, D]
  assert np.isfinite(got).all()
  assert_within_tolerance(rel_rms(got, full64), rel_rms(full32, full64), jnp.float32, name)


def test_module_cache_errors():
  for bad, match in ((dict(decode_chunk_size=0), "decode_chunk_size"),
                     (dict(decode_skip_tolerance=2.0), "decode_skip_tolerance"),
                     (dict(interpret=True), "interpret applies")):
    with pytest.raises(ValueError, match=match):
      _module("stickbreaking", **bad)
  module = _module("stickbreaking")
  x = jnp.ones((1, 3, 16))
  with pytest.raises(ValueError, match="init_cache"):
    module(x, decode=True)
  module.init_cache((1, 3))
  with pytest.raises(ValueError, match="overflow: 4 new tokens"):
    module(jnp.ones((1, 4, 16)), decode=True, prompt_lengths=jnp.asarray([4]))
  with pytest.raises(ValueError, match="prompt_lengths"):
    module(x, decode=True, prompt_lengths=jnp.asarray([0]))
  with pytest.raises(ValueError, match="batch 2"):
    module(jnp.ones((2, 1, 16)), decode=True)
  module(x, decode=True, prompt_lengths=jnp.asarray([3]))
  with pytest.raises(ValueError, match=r"overflow: 1 new token\(s\) at cache_index=\[3\]"):
    module(x[:, :1], decode=True)
  # Under jit the index is traced: the row past the cache's end comes back NaN, not wrapped.
  assert np.isnan(np.asarray(_step(module, x[:, :1]))).all()


# --- The LM: generate ----------------------------------------------------------------------

@functools.cache
def _jitted_forward():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.jit(lambda m, tokens: m(tokens))


def _continued_logits(model, prompt, lengths, tokens):
  """The full forward's logits ``[B, M, V]`` predicting each generated token: rows are the prompt
  then the generated tokens, right-padded to one length (causal: padding changes nothing before)."""
  b, m = tokens.shape
  seqs = np.zeros((b, prompt.shape[1] + m), np.int32)
  for row, length in enumerate(lengths):
    seqs[row, :length + m] = np.concatenate([np.asarray(prompt[row, :length]), tokens[row]])
  logits = np.asarray(_jitted_forward()(model, jnp.asarray(seqs)), np.float64)
  return np.stack([logits[row, length - 1:length - 1 + m] for row, length in enumerate(lengths)])


def _lm(attention):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sbjax.models import DecoderLM, lm_config  # pylint: disable=g-import-not-at-top
  config = lm_config("tiny", attention=attention, implementation="xla", num_kv_heads=2,
                     num_layers=1, forget_gate=attention == "stickbreaking")
  return DecoderLM(config, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


# softmax_nope's decode path is the module test's; RoPE is the one with positions to get right.
@pytest.mark.parametrize("attention", ["stickbreaking", "softmax_rope"])
def test_greedy_generate_is_the_argmax_of_the_full_forward(attention):
  from sbjax.models import generate  # pylint: disable=g-import-not-at-top
  model = _lm(attention)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 5)), jnp.int32)
  lengths = np.asarray([5, 2])
  tokens, log_probs = generate(model, prompt, 6, rng=jax.random.key(0), temperature=0.0,
                               prompt_lengths=jnp.asarray(lengths))
  assert tokens.shape == log_probs.shape == (2, 6) and np.isfinite(np.asarray(log_probs)).all()
  logits = _continued_logits(model, prompt, lengths, np.asarray(tokens))  # [B, 6, V]
  np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
  want = logits - logits.max(-1, keepdims=True)
  want = want - np.log(np.exp(want).sum(-1, keepdims=True))
  want = np.take_along_axis(want, np.asarray(tokens)[..., None], axis=-1)[..., 0]
  # Two float32 computations of the same log-softmax (cached decode vs the full forward).
  np.testing.assert_allclose(np.asarray(log_probs), want, rtol=1e-5, atol=1e-5)


def test_generate_samples_top_k_compiles_once_and_stops_at_eos():
  from sbjax.models import generate  # pylint: disable=g-import-not-at-top
  from sbjax.models.generate import _generate  # pylint: disable=g-import-not-at-top
  model = _lm("stickbreaking")
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 4)), jnp.int32)
  # eos: the greedy first token of row 0, so a greedy call stops that row at once.
  eos = int(np.argmax(np.asarray(_jitted_forward()(model, prompt))[0, -1]))
  before = _generate._cache_size()
  greedy, sampled, other = (
      generate(model, prompt, 5, rng=jax.random.key(seed), temperature=temperature, top_k=3,
               eos_id=eos) for seed, temperature in ((0, 0.0), (0, 1.0), (1, 2.0)))
  assert _generate._cache_size() == before + 1  # new rng and temperature: no recompilation
  np.testing.assert_array_equal(np.asarray(greedy[0][0]), eos)  # stopped at once, eos-filled
  np.testing.assert_array_equal(np.asarray(greedy[1][0, 1:]), 0.0)
  assert not np.array_equal(np.asarray(sampled[0]), np.asarray(other[0]))
  for tokens, log_probs in (sampled, other):
    tokens = np.asarray(tokens)
    logits = _continued_logits(model, prompt, [4, 4], tokens)  # [B, 5, V]
    in_top3 = (np.argsort(logits, axis=-1)[..., -3:] == tokens[..., None]).any(-1)
    after_eos = np.cumsum(tokens == eos, axis=1) - (tokens == eos) > 0  # strictly after an eos
    assert (in_top3 | after_eos).all()
    assert (tokens[after_eos] == eos).all() and (np.asarray(log_probs)[after_eos] == 0).all()
    assert (np.asarray(log_probs)[~after_eos] < 0).all()


@pytest.mark.parametrize("change,match", [
    (dict(prompt_tokens=jnp.ones((4,), jnp.int32)), "prompt_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=300), "top_k"),
    (dict(eos_id=256), "eos_id"),
    (dict(temperature=-1.0), "temperature"),
    (dict(prompt_lengths=jnp.asarray([5, 1])), "prompt_lengths"),
])
def test_bad_generate_arguments_are_named(change, match):
  from sbjax.models import generate  # pylint: disable=g-import-not-at-top
  args = dict(prompt_tokens=jnp.ones((2, 4), jnp.int32), max_new_tokens=2, rng=jax.random.key(0))
  args.update(change)
  with pytest.raises(ValueError, match=match):
    generate(_lm("softmax_nope"), **args)


def test_generate_experiment_end_to_end():
  """experiments/generate.py on a shrunken run: 1 step, prompts of two lengths, 3 bytes each."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "experiments"))
  import generate_lib as experiment  # pylint: disable=g-import-not-at-top
  kwargs = dict(train_steps=1, seq_len=16, batch=2, max_new_tokens=3, temperature=0.0,
                progress_bar=False, num_layers=1, d_model=16, mlp_dim=16)
  samples = experiment.train_and_sample(experiment.default_text()[:400], ["1 2 ", "7"], **kwargs)
  assert [s[0] for s in samples] == ["1 2 ", "7"]
  assert all(len(s[1]) >= 1 for s in samples)  # 3 bytes, fewer characters if not UTF-8
  assert all(np.isfinite(s[2]) and s[2] < 0 for s in samples)
  with pytest.raises(ValueError, match="prompts"):
    experiment.train_and_sample("x" * 100, [""], **kwargs)


def test_generate_experiment_samples_a_length_extrapolation_run(tmp_path):
  """``--run_dir``: a finished run laid out as experiments/length_extrapolation.py writes it
  (``runs/<name>/run.json`` + checkpoints, ``tokenizer.json`` two levels up) is restored and
  continued with its BPE tokenizer; greedy sampling is reproducible."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "experiments"))
  import generate_lib as experiment  # pylint: disable=g-import-not-at-top
  run_dir, _ = tiny_length_extrapolation_run(tmp_path)
  sample = lambda: experiment.sample_run(str(run_dir), ["It was", "the worst"], max_new_tokens=5,
                                         temperature=0.0)
  samples = sample()
  assert [s[0] for s in samples] == ["It was", "the worst"]
  assert all(isinstance(s[1], str) and np.isfinite(s[2]) and s[2] < 0 for s in samples)
  assert samples == sample()
  with pytest.raises(ValueError, match="run_dir must hold a length-extrapolation run"):
    experiment.sample_run(str(tmp_path), ["x"])


@pytest.mark.parametrize("shift,tolerance,chunks_read", [
    (0.0, 0.0, 1),  # "local": beta ~ 1/2, the stick is below 2^-152 within the nearest chunk
    (-5.0, 0.0, 16),  # "far": beta ~ 1e-2, 4096 keys leave rem ~ 1e-19 > 2^-152: all read
    (-5.0, 1e-3, 3),  # ... but rem < 1e-3 after 3 chunks
])
def test_cache_read_in_synthetic_regimes(shift, tolerance, chunks_read):
  """Logits z = shift + N(0, 1) over S=4096 keys in chunks of 256 (the default): how many chunks
  each row reads before its stick is used up (deterministic for these seeds)."""
  b, s = 2, 4096
  rng = np.random.default_rng(0)
  q = jnp.ones((b, 1, 1, 2), jnp.float32)
  k = jnp.asarray(np.stack([np.full((b, s), shift), rng.normal(size=(b, s))], -1)[:, :, None],
                  jnp.float32)  # q . k = shift + N(0, 1)
  v = jnp.asarray(rng.normal(size=(b, s, 1, 4)), jnp.float32)
  out, rem, keys_read = sbjax.stick_breaking_decode(
      q, k, v, jnp.full((b,), s, jnp.int32), scale=1.0, skip_tolerance=tolerance,
      return_remainder=True, return_keys_read=True)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(np.asarray(keys_read), chunks_read * 256)
  if chunks_read < 16:
    assert (np.asarray(rem, np.float64) < (tolerance or 2.0**-152)).all()


@pytest.mark.parametrize("shift,tolerance,keys_read", [
    (0.0, 0.0, 512),  # each of the first launch's 2 chunks: one check's 4 blocks; no far chunk
    (-5.0, 0.0, 4096),  # every chunk, to the end of each (rem ~ 1e-19 after 4096 keys)
    (-5.0, 1e-3, 1024),  # the first launch's 2 chunks: rem < 1e-3 after them
])
def test_kernel_cache_read_in_synthetic_regimes(shift, tolerance, keys_read):
  """The kernel with its default blocks (chunks of 512, checks every 4 blocks of 64) on the
  regimes of test_cache_read_in_synthetic_regimes: z = shift + N(0, 1), S=4096."""
  b, s = 2, 4096
  rng = np.random.default_rng(0)
  q = jnp.ones((b, 1, 1, 2), jnp.float32)
  k = jnp.asarray(np.stack([np.full((b, s), shift), rng.normal(size=(b, s))], -1)[:, :, None],
                  jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, 1, 4)), jnp.float32)
  out, rem, read = pallas_triton_decode.decode(
      q, k, v, jnp.full((b,), s, jnp.int32), 1.0, attend_current=False,
      skip_tolerance=tolerance, return_keys_read=True, interpret=True)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_array_equal(np.asarray(read), keys_read)
  if keys_read < s:
    assert (np.asarray(rem, np.float64) < (tolerance or 2.0**-152)).all()
