"""The package's shape: layers import only downward, experiments use the public API, and the op
imports without Flax."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent

# What each layer may import from sbjax (besides itself): experiments -> models -> nn -> ops ->
# kernels | scan | reference, with the leaf helpers common and platform.
ALLOWED = {
    "common": set(), "platform": set(), "parallel": set(), "data": set(),
    "reference": {"common"}, "scan": {"common"}, "decode": {"common"}, "kernels": {"common"},
    "testing": {"common", "reference", "ops"},
    "ops": {"common", "platform", "reference", "scan", "decode", "kernels"},
    "context_parallel": {"common", "ops", "parallel"},
    "nn": {"ops", "context_parallel", "kernels", "parallel", "platform"},
    "models": {"nn", "kernels", "parallel"},
    "training": {"parallel"},
}
PUBLIC = {"sbjax", "sbjax.context_parallel", "sbjax.data", "sbjax.models", "sbjax.nn", "sbjax.parallel", "sbjax.testing",
          "sbjax.training"}


def _sbjax_imports(path: pathlib.Path) -> set[str]:
  """The sbjax modules ``path`` imports (``from sbjax import nn`` imports ``sbjax.nn``)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      if node.module == "sbjax":  # a submodule, or a name of sbjax/__init__.py
        names |= {f"sbjax.{a.name}" if a.name.islower() else "sbjax" for a in node.names}
      else:
        names.add(node.module)
  return {n for n in names if n == "sbjax" or n.startswith("sbjax.")}


@pytest.mark.parametrize("path", sorted((ROOT / "sbjax").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_only_downward(path):
  layer = path.relative_to(ROOT / "sbjax").parts[0].removesuffix(".py")
  if layer == "__init__":
    return
  imported = {n.split(".")[1] for n in _sbjax_imports(path) if n != "sbjax"}
  assert imported - {layer} <= ALLOWED[layer], f"{path.name} imports {imported - {layer}}"


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_experiments_use_the_public_api(path):
  modules = {n for n in _sbjax_imports(path) if n not in PUBLIC and not n.startswith("sbjax.data.")}
  if path.name.endswith("_ablation_lib.py"):  # ablation probes patch kernel internals on purpose
    modules = {n for n in modules if n.split(".")[:2] != ["sbjax", "kernels"]}
  assert not modules, f"{path.name} reaches past the public API: {sorted(modules)}"


def test_the_op_imports_without_flax():
  code = ("import sys, sbjax, sbjax.reference; sbjax.stick_breaking_attention; "
          "assert 'flax' not in sys.modules, 'flax imported'; "
          "sbjax.StickBreakingAttention; assert 'flax' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_docs_cited_are_in_the_repository():
  """Docstrings and docs cite docs/design.md, which ships with the repository, not a design file
  that users of a clone do not have."""
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  assert (ROOT / "docs" / "design.md").exists()
  for name in set(tracked) - {"tests/test_package.py"}:  # this file names what it looks for
    if name.endswith((".py", ".md", ".ipynb", ".toml", ".sh")) and (ROOT / name).exists():
      text = (ROOT / name).read_text(errors="ignore")
      assert "DESIGN.md" not in text and "shared/DESIGN" not in text, name
