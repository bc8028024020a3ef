#!/usr/bin/env bash
# Create .venv and install repro with its test extras. torch is pinned (torch==2.13.0):
# a wheel already on local disk (pip's find-links) is used as is; otherwise a machine with an
# NVIDIA driver gets PyPI's CUDA build and a machine without one gets the CPU-only build
# (PyPI's default Linux wheel would pull gigabytes of CUDA libraries it cannot use).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH="torch==2.13.0"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! pip show torch 2>/dev/null | grep -q '^Version: 2.13.0'; then
  # --no-deps: torch's own dependencies are not on local disk; they come from PyPI just below.
  if pip install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
    echo "torch: local wheel"
    pip install -q "$TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "$TORCH"
  else
    pip install -q "$TORCH" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
pip install -q -e ".[test]"
touch "$VENV/.installed"
