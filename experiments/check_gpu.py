r"""GPU check of the Pallas kernels (interpret=False) against the float64 scan path.

Realistic shapes (T up to 16384, H 64 and 128, bf16, GQA, segments, attend_current), forward and
gradients under the tolerance rule of ``sbjax.testing``; saturated logits (|z| up to 1e4); long
sequences (T=65536 forward and backward on one head, T=131072 forward); 20 backward runs compared
bitwise. Prints a PASS/FAIL table and exits non-zero on any failure.

  python experiments/check_gpu.py --out=experiments/results/check_gpu_h200.json
"""

from __future__ import annotations

import functools
import json
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import sbjax
from sbjax import reference, scan
from sbjax.testing import REL_RMS_CAP, Shape, assert_within_tolerance, random_inputs, rel_rms

_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")
_QUICK = flags.DEFINE_bool("quick", False, "Small shapes only (a smoke test).")


def _grads(attn, q, k, v, scale, d_out, d_rem):
  (out, rem), vjp = jax.vjp(attn, q, k, v, scale)
  return (out, rem) + vjp((d_out.astype(out.dtype), d_rem.astype(rem.dtype)))


def _pallas(seg, attend_current):
  return lambda q, k, v, s: sbjax.stick_breaking_attention(
      q, k, v, scale=s, segment_ids=seg, attend_current=attend_current, implementation="pallas",
      return_remainder=True)


def float64_outputs(q, k, v, seg, scale, attend_current, d_out, d_rem, with_grads=True):
  """out, rem (and dq, dk, dv, dscale) of the scan path in float64 on the GPU."""
  with jax.enable_x64(True):
    up = lambda x: jnp.asarray(x, jnp.float64)
    attn = lambda q, k, v, s: scan.stick_breaking_attention(q, k, v, s, seg,
                                                            attend_current=attend_current)
    args = (up(q), up(k), up(v), jnp.float64(scale))
    if not with_grads:
      return tuple(np.asarray(x) for x in jax.jit(attn)(*args))
    res = jax.jit(functools.partial(_grads, attn))(*args, up(d_out), up(d_rem))
    return tuple(np.asarray(x) for x in res)


def check_accuracy(name, shape, dtype, *, segments=False, attend_current=False, logit_scale=1.0,
                   with_grads=True, same_precision=True):
  """Compares the kernels with float64; returns a record with the errors per output."""
  q, k, v, seg = random_inputs(shape.t, shape, dtype, segments=segments, logit_scale=logit_scale)
  scale = shape.h**-0.5
  rng = np.random.default_rng(1)
  d_out = jnp.asarray(rng.normal(size=q.shape[:3] + v.shape[-1:]), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  attn = _pallas(seg, attend_current)
  if with_grads:
    got = jax.jit(functools.partial(_grads, attn))(q, k, v, jnp.float32(scale), d_out, d_rem)
  else:
    got = jax.jit(attn)(q, k, v, jnp.float32(scale))
  want = float64_outputs(q, k, v, seg, scale, attend_current, d_out, d_rem, with_grads)
  same = [None] * len(want)
  if same_precision:  # the dense reference with its math in the input dtype
    ref = lambda q, k, v, s: reference.stick_breaking_attention(
        q, k, v, s, seg, attend_current=attend_current, dtype=dtype)
    same = (jax.jit(functools.partial(_grads, ref))(q, k, v, jnp.float32(scale), d_out, d_rem)
            if with_grads else jax.jit(ref)(q, k, v, jnp.float32(scale)))
  names = ("out", "rem", "dq", "dk", "dv", "dscale")
  record = dict(check=name, shape=str(shape), dtype=jnp.dtype(dtype).name, errors={}, ok=True)
  for out_name, g, w, s in zip(names, got, want, same):
    err = rel_rms(g, w)
    record["errors"][out_name] = err
    try:
      if s is None:
        cap = REL_RMS_CAP[jnp.dtype(dtype)]
        assert err <= cap, f"{out_name}: {err:.3g} > cap {cap}"
      else:
        assert_within_tolerance(err, rel_rms(s, w), dtype, out_name)
    except AssertionError as e:
      record["ok"], record["failure"] = False, str(e)
  return record


def check_determinism(runs=20):
  shape = Shape(2, 4096, 8, 2, 128)
  q, k, v, seg = random_inputs(0, shape, jnp.bfloat16, segments=True)
  rng = np.random.default_rng(2)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_rem = jnp.asarray(rng.normal(size=q.shape[:3]), jnp.float32)
  fn = jax.jit(functools.partial(_grads, _pallas(seg, False)))
  first = [np.asarray(x) for x in fn(q, k, v, jnp.float32(0.1), d_out, d_rem)]
  same = all(
      all(np.array_equal(a, np.asarray(b)) for a, b in zip(first, fn(q, k, v, jnp.float32(0.1),
                                                                  d_out, d_rem)))
      for _ in range(runs - 1))
  return dict(check=f"determinism x{runs}", shape=str(shape), dtype="bfloat16", ok=bool(same))


def checks(quick: bool):
  """``(name, fn)`` pairs; each ``fn()`` returns a record."""
  bf16 = jnp.bfloat16
  acc = lambda name, *a, **kw: (name, functools.partial(check_accuracy, name, *a, **kw))
  yield acc("small fp32", Shape(1, 300, 4, 2, 64), jnp.float32, segments=True)
  yield acc("small fp16", Shape(1, 300, 4, 1, 80), jnp.float16, attend_current=True)
  yield acc("H128 T4096", Shape(2, 4096, 4, 2, 128), bf16)
  yield acc("H64 T4096 seg cur", Shape(1, 4096, 4, 4, 64), bf16, segments=True,
            attend_current=True)
  yield acc("H96 T3000 MQA", Shape(1, 3000, 4, 1, 96), bf16)
  yield acc("saturated |z|<=1e4", Shape(1, 2048, 2, 2, 64), bf16, logit_scale=1250.0)
  if quick:
    return
  yield acc("H128 T16384", Shape(1, 16384, 2, 1, 128), bf16, same_precision=False)
  yield acc("H64 T16384 seg", Shape(1, 16384, 2, 2, 64), bf16, segments=True,
            same_precision=False)
  yield acc("T65536 one head", Shape(1, 65536, 1, 1, 64), bf16, same_precision=False)
  yield acc("T131072 fwd", Shape(1, 131072, 1, 1, 64), bf16, with_grads=False,
            same_precision=False)
  yield "determinism x20", check_determinism


def main(argv):
  del argv
  print(jax.__version__, jax.devices()[0].device_kind, flush=True)
  records = []
  for name, check in checks(_QUICK.value):
    start = time.time()
    try:
      rec = check()
    except Exception as e:  # pylint: disable=broad-except
      rec = dict(check=name, ok=False, failure=f"{type(e).__name__}: {e}"[:400])
    rec["seconds"] = round(time.time() - start, 1)
    print(json.dumps(rec), flush=True)
    records.append(rec)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(dict(jax=jax.__version__, device=jax.devices()[0].device_kind,
                     date=time.strftime("%Y-%m-%d"), records=records), f, indent=1)
  print(f"\n{'check':24} {'shape':28} {'dtype':9} {'result':6} worst error")
  for r in records:
    worst = max(r.get("errors", {"-": 0}).items(), key=lambda kv: kv[1])
    print(f"{r['check']:24} {r.get('shape', ''):28} {r.get('dtype', ''):9} "
          f"{'PASS' if r['ok'] else 'FAIL':6} {worst[0]}={worst[1]:.2e}")
  print(f"{sum(r['ok'] for r in records)}/{len(records)} passed")
  sys.exit(0 if all(r["ok"] for r in records) else 1)


if __name__ == "__main__":
  app.run(main)
