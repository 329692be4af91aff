#!/usr/bin/env bash
# The test command: install (idempotent), lint, type-check and run the whole suite; then run
# the device-runtime tests again on Python 3.10 (JetPack 6's system Python) with the base
# install only — no torch, no transformers — against a tiny bundle built by the first leg.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
# A skipped test here means a missing component (torch, openai, mosquitto, curl): fail.
EDGE_TEST_FAIL_ON_SKIP=1 .venv/bin/pytest -q -p no:cacheprovider "$@"

# The first candidate that really is a working 3.10 (pyenv shims exist but may refuse to run).
if [ -z "${PY310:-}" ]; then
    for cand in python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
        if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
            PY310="$cand"
            break
        fi
    done
fi
if [ -z "${PY310:-}" ]; then
    if [ "${CI:-}" = "true" ]; then  # in CI a missing component fails loudly
        echo "device leg: no Python 3.10 found (set PY310=/path/to/python3.10)" >&2
        exit 1
    fi
    echo "device leg: no Python 3.10 on this machine; skipped (set PY310=/path/to/python3.10)"
    exit 0
fi
prebuilt=".test-cache/prebuilt"
if [ ! -f "$prebuilt/fused/manifest.json" ]; then
    rm -rf "$prebuilt"
    .venv/bin/edge-build demo --preset tiny --out "$prebuilt/bundle" > /dev/null
    .venv/bin/edge-build fuse "$prebuilt/bundle.work/int4" "$prebuilt/fused.work" > /dev/null
    .venv/bin/edge-build package "$prebuilt/fused.work" "$prebuilt/fused" \
        --key "$prebuilt/bundle.work/signing.key" --name edge-tiny-fused --version 1 > /dev/null
fi
[ -x .venv310/bin/python ] || "$PY310" -m venv .venv310
.venv310/bin/python -m pip install -q --upgrade pip
.venv310/bin/python -m pip install -q -e ".[dev,cpu]"  # [cpu]: ONNX Runtime on x86
if .venv310/bin/python -c "import torch" 2>/dev/null; then
    echo "device leg: torch is importable on the 3.10 venv; it must not be" >&2
    exit 1
fi
echo "device leg: $(.venv310/bin/python --version), base install, prebuilt tiny bundle"
# Only the offline pipeline's tests may skip here: torch is absent from a device by design.
EDGE_TEST_FAIL_ON_SKIP=1 EDGE_TEST_ALLOWED_SKIPS="'torch'" EDGE_TEST_PREBUILT="$prebuilt" \
    .venv310/bin/pytest -q -p no:cacheprovider "$@"
