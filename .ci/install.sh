#!/usr/bin/env bash
# Creates .venv and installs the project (editable) with its test extra.
# On a machine without an NVIDIA GPU the CPU build of torch 2.13.0 is pinned through a
# constraints file (a bare `torch` requirement would pull several GB of CUDA libraries).
# Idempotent: when nothing changed since the last successful run it returns in seconds.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${VENV:-$root/.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.installed-$(cat pyproject.toml .ci/constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi
constraints=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
    constraints=(-c .ci/constraints-cpu.txt)
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${constraints[@]}" -e ".[test]"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "installed the project into $venv"
