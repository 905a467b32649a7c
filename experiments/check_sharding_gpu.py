r"""The sharded train step on GPUs matches one GPU: meshes (data, model) = 2x1 and 1x2 vs 1x1.

Compares the gradients of one batch and the losses and parameters after ``--steps`` AdamW steps,
for stick-breaking (default implementation: the Pallas kernels inside ``shard_map``) and softmax.

  python experiments/check_sharding_gpu.py --out=experiments/results/sharding_h200x2.json
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from sbjax import parallel, training
from sbjax.models import DecoderLM, lm_config
from sbjax.testing import rel_rms

import logs

_ATTENTIONS = flags.DEFINE_list("attentions", ["stickbreaking", "softmax_rope"], "Attentions.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", None, "Stick-breaking implementation.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps compared.")
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")

MESHES = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}
# Gradients differ by reduction order only; Adam amplifies that for elements near its eps.
GRAD_TOL, PARAM_TOL = {"float32": 1e-4, "bfloat16": 2e-2}, {"float32": 1e-3, "bfloat16": 5e-2}


def run_mesh(config, data_model, steps: int) -> dict:
  mesh = parallel.make_mesh(*data_model)
  with jax.set_mesh(mesh):
    model = nnx.jit(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))()
  tx = training.make_optimizer(training.TrainConfig(num_steps=100, warmup_steps=0, learning_rate=1e-3))
  graphdef, rest, state, shardings = training.init_train_state(model, tx, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, size=(steps, 8, 513)).astype(np.int32)
  batches = [jax.device_put({"inputs": t[:, :-1], "targets": t[:, 1:]}, parallel.batch_sharding(mesh))
             for t in tokens]

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params, rest)(batch["inputs"])
    return training.cross_entropy(logits, batch["targets"])[0]

  with jax.set_mesh(mesh):
    grads = jax.jit(jax.grad(loss_fn))(state.params, batches[0])
  step = training.make_train_step(graphdef, rest, tx, mesh, shardings)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  kernel = state.params["blocks"][0]["attention"]["query_kernel"][...]
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])
  return {"losses": losses, "grads": flat(grads), "params": flat(state.params),
          "query_kernel_spec": str(kernel.sharding.spec), "devices": len(kernel.sharding.device_set)}


def main(argv):
  del argv
  logs.install()
  results = {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
             "dtype": _DTYPE.value, "checks": {}}
  ok = True
  for attention in _ATTENTIONS.value:
    config = lm_config("tiny", vocab_size=1024, d_model=256, num_heads=4, mlp_dim=512,
                       num_layers=2, attention=attention, implementation=_IMPLEMENTATION.value,
                       dtype=_DTYPE.value)
    try:
      runs = {name: run_mesh(config, shape, _STEPS.value) for name, shape in MESHES.items()}
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      results["checks"][attention] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      ok = False
      continue
    one = runs["1x1"]
    for name in ("2x1", "1x2"):
      r = runs[name]
      finite = bool(np.isfinite(r["grads"]).all() and np.isfinite(r["params"]).all())
      check = {"losses": r["losses"], "losses_1x1": one["losses"],
               "grads_rel_rms": rel_rms(r["grads"], one["grads"]) if finite else None,
               "params_rel_rms": rel_rms(r["params"], one["params"]) if finite else None,
               "query_kernel_spec": r["query_kernel_spec"], "devices": r["devices"],
               "finite": finite}
      check["pass"] = (check["finite"] and check["grads_rel_rms"] < GRAD_TOL[_DTYPE.value]
                       and check["params_rel_rms"] < PARAM_TOL[_DTYPE.value]
                       and np.allclose(r["losses"], one["losses"], rtol=GRAD_TOL[_DTYPE.value]))
      ok &= check["pass"]
      results["checks"][f"{attention}/{name}"] = check
      print(attention, name, "PASS" if check["pass"] else "FAIL", json.dumps(check), flush=True)
  results["pass"] = bool(ok)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  app.run(main)
