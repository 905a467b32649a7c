#!/usr/bin/env bash
# Runs a command inside the project's virtual environment (.venv), creating it on first use.
#   ./tools/venv.sh python experiments/demo.py
#   ./tools/venv.sh pytest -n 2 tests
# The environment uses Python 3.12 (python3.12 on PATH, else pyenv's 3.12.x) and pins JAX to the
# GPU machine's version through constraints.txt. SBJAX_PYTHON overrides the interpreter,
# SBJAX_VENV the environment's directory. Each install stage says what it does on stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SBJAX_VENV:-$root/.venv}"
stamp="$venv/.installed"  # written last: an interrupted install is redone
say() { echo "venv.sh: $*" >&2; }
if [[ ! -f "$stamp" ]]; then
  py="${SBJAX_PYTHON:-}"
  if [[ -z "$py" ]]; then
    if command -v python3.12 >/dev/null && python3.12 -c '' 2>/dev/null; then
      py=python3.12
    elif command -v pyenv >/dev/null; then
      v="$(pyenv versions --bare | grep -E '^3\.12(\.|$)' | tail -n 1 || true)"
      [[ -n "$v" ]] && py="$(pyenv root)/versions/$v/bin/python"
    fi
  fi
  [[ -n "$py" && -x "$(command -v "$py")" ]] || { say "sbjax needs Python 3.12 (or set SBJAX_PYTHON)"; exit 1; }
  start=$SECONDS
  say "first use: creating $venv with $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$py" -m venv --clear "$venv"
  say "upgrading pip"
  "$venv/bin/python" -m pip install -q --upgrade pip
  say "installing sbjax[test] and its dependencies (JAX pinned by constraints.txt; a minute or two)"
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]"
  touch "$stamp"
  say "ready in $((SECONDS - start)) s; later runs start at once"
fi
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
