#!/bin/bash
# Once the peers are done: one table of every result JSON (the GPU section of BENCHMARKS.md).
#   render.sh [MARKER] [SECONDS]: wait at most SECONDS (510) for MARKER (torch.done: after
#   torch.compile; torch-eager.done: before it) and llama.cpp's measurement.
. "$(dirname "$0")/env.sh"
MARK=${1:-torch.done}
for i in $(seq 1 $(( ${2:-510} / 3 ))); do [ -f "$G/$MARK" ] && [ -f "$G/llamabench.done" ] && break; sleep 3; done
export PYTHONPATH=$(pythonpath)
R=""; for f in ours torch torchc llama; do [ -f "$G/res/$f.json" ] && R="$R $G/res/$f.json"; done
"$PY" "$SRC/scripts/bench_decode.py" --device cuda --render $R --md "$OUT/BENCHMARKS.md" > /dev/null
tar czf "$OUT/res.tar.gz" -C "$G" res 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$G" logs 2>/dev/null
cp "$G/src/docs/BENCHMARKS.md" "$OUT/spec.md" 2>/dev/null
cat "$OUT/BENCHMARKS.md"
