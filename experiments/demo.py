r"""A tour of the op: every available implementation on random data, against float64.

Prints each implementation's relative RMS error against the float64 reference (output and
remainder) and its median time (jit, warm-up excluded). On a CPU the Pallas kernels run in
interpret mode on a small shape only.

  python experiments/demo.py
  python experiments/demo.py --seq_len=2048 --num_heads=8 --dtype=bfloat16 --forget_gate
"""

from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import sbjax
from sbjax.testing import Shape, float64_result, median_time_ms, random_inputs, rel_rms

import logs

_BATCH = flags.DEFINE_integer("batch", 2, "B.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "T.")
_HEADS = flags.DEFINE_integer("num_heads", 4, "N (query heads).")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "K (key/value heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "H.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
_FORGET_GATE = flags.DEFINE_bool("forget_gate", False, "Pass random forget-gate logits [B, T, K].")


def main(argv):
  del argv
  logs.install()
  shape = Shape(_BATCH.value, _SEQ_LEN.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value)
  dtype = jnp.dtype(_DTYPE.value)
  on_gpu = sbjax.default_implementation() == "pallas"  # an NVIDIA GPU: the kernels compile
  q, k, v, seg = random_inputs(0, shape, dtype, segments=False)
  g = None
  if _FORGET_GATE.value:
    g = jnp.asarray(np.random.default_rng(1).normal(size=(shape.b, shape.t, shape.k)), jnp.float32)
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; {shape}, {dtype.name}"
        + (", forget gate" if g is not None else ""))
  want_out, want_rem = float64_result(q, k, v, seg, shape.h**-0.5, False, g)
  print(f"{'implementation':26} {'out rel RMS':>12} {'rem rel RMS':>12} {'ms':>9}")
  for impl in ("xla", "scan", "pallas"):
    interpret = impl == "pallas" and not on_gpu
    args = (q, k, v, g)
    if interpret and shape.t > 256:  # interpret mode is slow: a prefix of the sequence
      args = tuple(None if x is None else x[:, :256] for x in args)
    fn = jax.jit(lambda q, k, v, g, impl=impl, interpret=interpret: sbjax.stick_breaking_attention(
        q, k, v, forget_gate=g, implementation=impl, interpret=interpret, return_remainder=True))
    out, rem = fn(*args)
    t = out.shape[1]
    ms = median_time_ms(fn, args, iters=3 if interpret else 10)
    name = impl + (" (interpret, T=256)" if interpret and t < shape.t else
                   " (interpret)" if interpret else "")
    print(f"{name:26} {rel_rms(out, want_out[:, :t]):12.2e} {rel_rms(rem, want_rem[:, :t]):12.2e} "
          f"{ms:9.2f}")


if __name__ == "__main__":
  app.run(main)
