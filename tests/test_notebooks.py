"""The notebooks run top to bottom in a Jupyter kernel (nbclient, the runner behind
``jupyter execute``), each within a time limit, and are committed with their outputs.

To refresh the committed outputs after a change: ``jupyter execute --inplace notebooks/0*.ipynb``.
"""

import asyncio
import pathlib
import time

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# Per notebook, kernel start-up included: the limit for a 2-core CPU. Each notebook takes
# 30-70 s there when run alone (notebooks/README.md lists them).
TIME_LIMIT_S = 120


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_within_time_limit(path):
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      notebook, timeout=TIME_LIMIT_S, kernel_name="python3",
      resources={"metadata": {"path": str(path.parent)}})  # cells run in notebooks/
  start = time.perf_counter()
  try:
    # async_execute starts the kernel, runs every cell and shuts the kernel down; wait_for bounds
    # the whole notebook (nbclient's own timeout is per cell) and cancels it, kernel included.
    asyncio.run(asyncio.wait_for(client.async_execute(), TIME_LIMIT_S))
  except Exception as e:  # a cancelled run surfaces as TimeoutError or as nbclient's DeadKernelError
    if time.perf_counter() - start >= TIME_LIMIT_S:
      pytest.fail(f"{path.name} took more than {TIME_LIMIT_S} s (stopped: {type(e).__name__})")
    raise
  elapsed = time.perf_counter() - start
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors, errors  # nbclient raises CellExecutionError first; this is a second guard
  print(f"{path.name}: {elapsed:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_outputs_of_one_run(path):
  """Every code cell was executed once, in order, by one kernel, and the plots are there."""
  cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
  assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), (
      f"{path.name} is not saved from a top-to-bottom run: refresh it with "
      f"`jupyter execute --inplace {path.relative_to(path.parent.parent)}`")
  outputs = [o for c in cells for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no plot"


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3, [p.name for p in NOTEBOOKS]
