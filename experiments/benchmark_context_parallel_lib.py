r"""Logic of experiments/benchmark_context_parallel.py (importable without its flags): the
context-parallel op on ``C`` devices against the same op on one device, timed side by side.

For each ``T`` and logit regime (``benchmark_lib.benchmark_inputs``) and walk (``skip``: exact
skipping, in the kernels and of used-up pieces; ``dense``: ``BlockSizes(skip_used_stick=False)``,
every key and every piece walked, what heads that attend far cost), the records hold:

- ``devices``: 1 (the op on the first device) or ``C`` (``sbjax.context_parallel`` over a
  ``(1, 1, C)`` mesh, ``T`` sharded over ``"context"``);
- ``ms`` (median, warm-up excluded), ``tflops``: counted work (``4 B N T^2 H / 2`` per causal
  forward, 3.5x per forward+backward, as ``benchmark_lib``) over the time, summed over devices;
- ``peak_bytes``: XLA's compiled peak per device (arguments, outputs, scratch), beside
  ``device_bytes``, what the allocator may use on one device (GPU only);
- ``finite``: every output (the forward's, and with fwd+bwd the three gradients) is finite;
- on the ``C``-device record: ``speedup`` (one device's time over this one's) and ``max_err``, the
  largest of max|x_C - x_1| / max|x_1| over the outputs (they differ by reduction order only).

A configuration that fails (e.g. out of memory on one device) records its error and the run goes on.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import sbjax
from sbjax import context_parallel, parallel
from sbjax.testing import median_time_ms

from benchmark_lib import PASS_FLOPS, benchmark_inputs, compile_pass

WALKS = ("skip", "dense")
MODES = ("fwd", "fwd+bwd")


def attention(mesh, implementation, walk: str, interpret: bool = False):
  """``f(q, k, v, scale) -> out``: the op on ``mesh``'s context axis (``mesh=None``: one device)."""
  if walk not in WALKS:
    raise ValueError(f"walks must be among {WALKS}, got {walk!r}.")
  block_sizes = None
  if walk == "dense":
    if implementation not in (None, "pallas", "pallas_triton"):
      raise ValueError("the dense walk needs the Pallas kernels (BlockSizes(skip_used_stick="
                       f"False)), got implementation={implementation!r}.")
    block_sizes = sbjax.BlockSizes(skip_used_stick=False)
  return lambda q, k, v, s: context_parallel.stick_breaking_attention(
      q, k, v, mesh=mesh, scale=s, implementation=implementation, interpret=interpret,
      block_sizes=block_sizes)


def run(seq_lens, regimes, walks, modes, *, batch: int, heads: int, head_dim: int, dtype,
        context: int, iters: int, implementation=None, interpret: bool = False,
        single_max_len: int | None = None, log=print):
  """Benchmark records (module docstring); one device first, then ``context`` devices. Above
  ``single_max_len`` the one-device configuration is compiled (its ``peak_bytes`` recorded) but
  not run."""
  for name, got, allowed in (("modes", modes, MODES), ("walks", walks, WALKS)):
    if bad := [x for x in got if x not in allowed]:
      raise ValueError(f"{name} must be among {allowed}, got {bad}.")
  if not 2 <= context <= jax.device_count():
    raise ValueError(f"context must be in [2, {jax.device_count()}] (the devices), got {context}.")
  mesh = parallel.make_mesh(1, 1, context)
  seq = NamedSharding(mesh, P(None, parallel.CONTEXT))  # [B, T, ...] with T over the devices
  stats = jax.devices()[0].memory_stats() or {}  # {} on the CPU
  meta = dict(B=batch, N=heads, H=head_dim, dtype=jnp.dtype(dtype).name, jax=jax.__version__,
              gpu=jax.devices()[0].device_kind, device_bytes=stats.get("bytes_limit"),
              implementation=implementation or "default")
  records = []
  for t in seq_lens:
    d_out = jnp.asarray(np.random.default_rng(1).normal(size=(batch, t, heads, head_dim)), dtype)
    for regime in regimes:
      q, k, v, scale = benchmark_inputs(regime, batch, t, heads, head_dim, dtype)
      for walk in walks:
        for mode in modes:
          flops = 4 * batch * heads * t * t * head_dim / 2 * PASS_FLOPS[mode]
          one = {}
          for devices in (1, context):
            rec = dict(T=t, regime=regime, walk=walk, devices=devices, **{"pass": mode}, **meta)
            try:
              args = (q, k, v, jnp.float32(scale)) + ((d_out,) if mode != "fwd" else ())
              if devices > 1:
                args = tuple(jax.device_put(a, seq) if a.ndim else a for a in args)
              attn = attention(mesh if devices > 1 else None, implementation, walk, interpret)
              compiled, rec["peak_bytes"] = compile_pass(attn, mode, args)
              if devices == 1 and single_max_len is not None and t > single_max_len:
                rec["error"] = f"not run: T > single_max_len={single_max_len} (compiled only)"
              else:
                rec["ms"] = median_time_ms(compiled, args, iters)
                rec["tflops"] = flops / rec["ms"] / 1e9
                outs = jax.tree.leaves(compiled(*args))  # out, and with fwd+bwd dq, dk, dv
                outs = [np.asarray(x, np.float32) for x in outs]
                rec["finite"] = all(bool(np.isfinite(x).all()) for x in outs)
                if devices == 1:
                  one.update(ms=rec["ms"], outs=outs)
                elif "ms" in one:
                  rec["speedup"] = one["ms"] / rec["ms"]
                  rec["max_err"] = max(float(np.abs(x - y).max() / np.abs(y).max())
                                       for x, y in zip(outs, one["outs"]))
              del compiled
            except Exception as e:  # pylint: disable=broad-except
              rec["error"] = f"{type(e).__name__}: {e}"[:500]
            log(json.dumps(rec))
            records.append(rec)
  return records


def format_table(records) -> str:
  lines = [f"{'T':>7} {'regime':8} {'walk':5} {'pass':7} {'dev':>3} {'ms':>10} {'TFLOP/s':>8} "
           f"{'GiB/dev':>7} {'speedup':>7}"]
  for r in records:
    head = f"{r['T']:>7} {r['regime']:8} {r['walk']:5} {r['pass']:7} {r['devices']:>3}"
    gib = "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.2f}"
    if "error" in r:
      lines.append(f"{head} {'':>10} {'':>8} {gib:>7} {r['error'][:60]}")
      continue
    speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
    lines.append(f"{head} {r['ms']:10.2f} {r['tflops']:8.1f} {gib:>7} {speedup:>7}")
  return "\n".join(lines)

