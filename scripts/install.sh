#!/usr/bin/env bash
# Create .venv and install repro (distribution repro-lowbit-quant) with its test extras, which hold
# every other extra, at the exact versions of constraints.txt (pyproject.toml keeps ranges). Packages
# come from wherever pip is configured to look (pip.conf, PIP_* variables; a wheel on local disk
# through find-links is taken as is); nothing here names an index. On a machine without an NVIDIA
# GPU, the public index's default Linux torch wheel pulls gigabytes of CUDA libraries it cannot use:
# set TORCH_INDEX_URL to PyTorch's CPU wheel index to take the CPU build (torch's own dependencies
# must then be on that index too, or install torch first yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH=$(grep -E '^torch==' constraints.txt)  # torch==X.Y.Z

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# the distribution was named `repro` before: a .venv made then has it (same import name, same script)
if pip show repro >/dev/null 2>&1; then
  pip uninstall -q -y repro
fi
# torch first, at constraints.txt's version, from TORCH_INDEX_URL where set; its dependencies take
# whatever that index has here, and the next step brings them to constraints.txt's versions
if ! pip show torch 2>/dev/null | grep -Eq "^Version: ${TORCH#torch==}(\+|$)"; then
  pip install -q "$TORCH" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
pip install -q -c constraints.txt -e ".[test]"
touch "$VENV/.installed"
