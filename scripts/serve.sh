#!/usr/bin/env bash
# One command from a fresh clone to a serving daemon: install, build the demo model on first
# run (cached in ~/.cache/edge-runtime), serve on http://127.0.0.1:8000 (flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/edge-runtime serve "$@"
