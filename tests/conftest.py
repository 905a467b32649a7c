"""Shared pytest fixtures of the op suites (helpers.py holds plain functions)."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test with ``jax_enable_x64``, as a user computing in float64 would."""
  with jax.enable_x64(True):
    yield
