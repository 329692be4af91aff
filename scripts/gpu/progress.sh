#!/bin/bash
# What the background job has done so far (the tail of each log).
. "$(dirname "$0")/env.sh"
echo "== done: $(ls "$G"/*.done 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
for f in "$G"/logs/*.log; do echo "== $(basename "$f"): $(tail -c 300 "$f" | tr '\n' ' ' | tail -c 300)"; done
uptime; nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
