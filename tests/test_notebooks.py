"""Every notebook runs top to bottom (code cells executed in order in one namespace)."""

import json
import pathlib

import matplotlib
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(path.parent)
  cells = json.loads(path.read_text())["cells"]
  namespace = {"__name__": "__notebook__"}
  for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    source = "".join(cell["source"])
    exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # pylint: disable=exec-used


def test_there_are_notebooks():
  assert NOTEBOOKS
