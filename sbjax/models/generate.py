"""``generate``: sampling from a ``DecoderLM`` with its KV caches, compiled once for all steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _check_positive_int(name, value):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")


def generate(model, prompt_tokens, max_new_tokens: int, *, rng, temperature=1.0,
             top_k: int | None = None, eos_id: int | None = None, prompt_lengths=None):
  """Samples ``max_new_tokens`` tokens after each prompt; returns ``(tokens, log_probs)``.

  Prompts of different lengths are **right-padded**: row ``b`` of ``prompt_tokens [B, P]`` holds
  its prompt in ``[:prompt_lengths[b]]`` (the rest is ignored). The whole prompt batch is one
  prefill (the training op, ``model(prompt, decode=True, prompt_lengths=...)``); every row then
  continues from its own length, with its own cache index, so no position is shifted and no left
  padding is attended. Then a ``lax.while_loop`` of one-token decode steps (stopping early once
  every row has emitted ``eos_id``), all inside one ``jax.jit``: calls with the same model
  structure, shapes, ``max_new_tokens``, ``top_k`` and ``eos_id`` compile once (``temperature``
  and ``rng`` are traced). The model passed in is not modified (the caches live in a copy).

  Args:
    model: a ``sbjax.models.DecoderLM``.
    prompt_tokens: ``[B, P]`` integer token ids.
    max_new_tokens: tokens to sample per row; the caches hold ``P + max_new_tokens`` tokens.
    rng: a ``jax.random`` key.
    temperature: softmax temperature (a float or scalar array); 0 takes the argmax (greedy).
    top_k: sample among the ``top_k`` most likely tokens only (``None``: all).
    eos_id: a row stops after sampling this token; its later tokens are ``eos_id`` with
      log-probability 0.
    prompt_lengths: ``[B]`` integers in ``[1, P]``; default ``P`` for every row.

  Returns:
    ``tokens [B, max_new_tokens]`` int32 and ``log_probs [B, max_new_tokens]`` float32: each
    sampled token's log-probability under the model (temperature 1, no top-k), for scoring.
  """
  if not hasattr(prompt_tokens, "shape") or prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be an integer array [B, P], got {prompt_tokens!r:.80}.")
  if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise TypeError(f"prompt_tokens must be integers, got {prompt_tokens.dtype=}.")
  b, p = prompt_tokens.shape
  _check_positive_int("max_new_tokens", max_new_tokens)
  vocab_size = model.config.vocab_size
  if top_k is not None:
    _check_positive_int("top_k", top_k)
    if top_k > vocab_size:
      raise ValueError(f"top_k must be at most vocab_size={vocab_size}, got {top_k=}.")
  if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < vocab_size):
    raise ValueError(f"eos_id must be None or an int in [0, {vocab_size}), got {eos_id=}.")
  if not isinstance(temperature, jax.core.Tracer) and not float(temperature) >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature=}.")
  if prompt_lengths is None:
    prompt_lengths = np.full((b,), p)
  if not isinstance(prompt_lengths, jax.core.Tracer):
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer) or (
        lengths.min() < 1 or lengths.max() > p):
      raise ValueError(f"prompt_lengths must be [B]=({b},) integers in [1, P={p}], got "
                       f"prompt_lengths={lengths.tolist()}.")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_tokens, jnp.int32),
                   jnp.asarray(prompt_lengths, jnp.int32), rng, jnp.asarray(temperature, jnp.float32),
                   max_new_tokens=max_new_tokens, top_k=top_k, eos_id=eos_id)


def _sample(logits, key, temperature, top_k):
  """``logits [B, V]`` -> ``(token [B], log p(token) [B])``; greedy at temperature 0."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  if top_k is not None:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]  # [B, 1] the k-th largest
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  token = jnp.where(temperature > 0, jax.random.categorical(key, scaled, axis=-1),
                    jnp.argmax(logits, axis=-1)).astype(jnp.int32)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "eos_id"))
def _generate(graphdef, state, prompt, lengths, rng, temperature, *, max_new_tokens, top_k,
              eos_id):
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape
  model.init_cache(b, p + max_new_tokens)
  logits = model(prompt, decode=True, prompt_lengths=lengths)  # [B, P, V]
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
  graphdef, state = nnx.split(model)  # now with the filled caches

  def body(carry):
    step, state, last, tokens, log_probs, done = carry
    token, log_prob = _sample(last, jax.random.fold_in(rng, step), temperature, top_k)
    if eos_id is not None:
      token = jnp.where(done, eos_id, token)
      log_prob = jnp.where(done, 0.0, log_prob)
      done = done | (token == eos_id)
    tokens = tokens.at[:, step].set(token)
    log_probs = log_probs.at[:, step].set(log_prob)
    model = nnx.merge(graphdef, state)
    last = model(token[:, None], decode=True)[:, 0]  # [B, V]
    return step + 1, nnx.state(model), last, tokens, log_probs, done

  def cond(carry):
    step, *_, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  fill = 0 if eos_id is None else eos_id
  init = (jnp.int32(0), state, last, jnp.full((b, max_new_tokens), fill, jnp.int32),
          jnp.zeros((b, max_new_tokens), jnp.float32), jnp.zeros((b,), bool))
  _, _, _, tokens, log_probs, _ = jax.lax.while_loop(cond, body, init)
  return tokens, log_probs
