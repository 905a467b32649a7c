"""tools/venv.sh with a stand-in interpreter: each install stage is announced on stderr, the
install pins JAX through constraints.txt, a finished environment is silent."""

import os
import pathlib
import stat
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "venv.sh"

# A stand-in for python3.12: `-m venv DIR` makes DIR/bin/python (itself), `-m pip ...` is logged.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-m venv") mkdir -p "${@: -1}/bin" && cp "$0" "${@: -1}/bin/python" ;;
  "-m pip") echo "pip ${*:3}" >> "$PIP_LOG" ;;
  *) echo "/fake/python3.12 3.12.0" ;;
esac
"""


def _run(tmp_path, **env):
  return subprocess.run([str(SCRIPT), "echo", "command ran"], capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=60)


def test_install_stages_are_announced_and_a_ready_venv_is_silent(tmp_path):
  fake = tmp_path / "python3.12"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = dict(SBJAX_PYTHON=str(fake), SBJAX_VENV=str(tmp_path / "venv"),
             PIP_LOG=str(tmp_path / "pip.log"))
  first = _run(tmp_path, **env)
  assert first.returncode == 0, first.stderr
  assert first.stdout == "command ran\n"
  stages = first.stderr.splitlines()
  assert [line.split(":")[0] for line in stages] == ["venv.sh"] * 4, stages
  assert "creating" in stages[0] and str(tmp_path / "venv") in stages[0] and "3.12.0" in stages[0]
  assert "pip" in stages[1] and "installing sbjax[test]" in stages[2] and "ready" in stages[3]
  pip = (tmp_path / "pip.log").read_text().splitlines()
  assert pip == ["pip install -q --upgrade pip",
                 f"pip install -q -c {ROOT}/constraints.txt -e {ROOT}[test]"]

  again = _run(tmp_path, **env)
  assert again.returncode == 0 and again.stdout == "command ran\n" and again.stderr == ""


def test_missing_python_is_named(tmp_path):
  result = _run(tmp_path, SBJAX_PYTHON=str(tmp_path / "nope"), SBJAX_VENV=str(tmp_path / "venv"))
  assert result.returncode == 1 and "needs Python 3.12" in result.stderr
