"""The experiments' log filter: what absl's INFO verbosity would show on every run but says nothing.

Every absl main calls ``install()`` first.
"""

from __future__ import annotations

import logging as std_logging

from absl import logging

# JAX notes at INFO that backends nobody asked for are missing (it keeps the error and raises it
# if such a backend is requested).
_ABSENT_BACKENDS = ("Unable to initialize backend 'tpu'", "Unable to initialize backend 'proxy'")


def quiet_logs(record: std_logging.LogRecord) -> bool:
  """False for orbax's INFO line per checkpoint and JAX's notes on absent TPU/proxy backends;
  True for everything else (other backends' failures and every warning show)."""
  if record.levelno >= std_logging.WARNING:
    return True
  if "orbax" in record.pathname:
    return False
  return not (record.name == "jax._src.xla_bridge"
              and record.getMessage().startswith(_ABSENT_BACKENDS))


def install() -> None:
  """Adds ``quiet_logs`` to absl's handler (call at the start of ``main``)."""
  logging.get_absl_handler().addFilter(quiet_logs)
