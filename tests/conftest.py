"""Shared pytest fixtures of the op suites (helpers.py holds plain functions)."""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
  """Runs the test with ``jax_enable_x64``, as a user computing in float64 would."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def cotangents():
  """``make(q, hv) -> (d_out [B, T, N, Hv], d_rem [B, T, N])``: fixed normal float64 cotangents."""
  def make(q, hv=None):
    rng = np.random.default_rng(5)
    return rng.normal(size=q.shape[:3] + (hv or q.shape[-1],)), rng.normal(size=q.shape[:3])
  return make
