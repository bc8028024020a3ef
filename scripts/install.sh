#!/usr/bin/env bash
# Create .venv and install repro with its test extras. torch is pinned (torch==2.13.0) and comes
# from wherever pip is configured to look (a wheel on local disk through find-links is taken as
# is). On a machine without an NVIDIA GPU, PyPI's default Linux wheel pulls gigabytes of CUDA
# libraries it cannot use: set TORCH_INDEX_URL to PyTorch's CPU wheel index to take the CPU build
# (torch's own dependencies must then be on that index too, or install torch first yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH="torch==2.13.0"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! pip show torch 2>/dev/null | grep -q '^Version: 2.13.0'; then
  pip install -q "$TORCH" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
pip install -q -e ".[test]"
touch "$VENV/.installed"
