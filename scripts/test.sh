#!/usr/bin/env bash
# The test command: install (idempotent) and run the whole suite, lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -q -p no:cacheprovider "$@"
