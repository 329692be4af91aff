#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the offline pipeline, dev tools and
# the CPU build of ONNX Runtime (a Jetson installs onnxruntime-gpu instead: README § Jetson).
# torch is pinned to the CPU build here; users with a CUDA build install their own first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[build,dev,cpu]"  # [cpu]: ONNX Runtime on x86
