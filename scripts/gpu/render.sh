#!/bin/bash
# The last call: one table of every decode result JSON (the "GPU decode" section of
# BENCHMARKS.md) and everything else the run wrote, into $OUT.
#   render.sh [MARKER] [SECONDS]: wait at most SECONDS (510) for MARKER (measure.done: after
#   measure.sh; torch.done: after torch.compile) and for llama.cpp's measurement.
. "$(dirname "$0")/env.sh"
MARK=${1:-measure.done}
for i in $(seq 1 $(( ${2:-510} / 3 ))); do [ -f "$G/$MARK" ] && [ -f "$G/llamabench.done" ] && break; sleep 3; done
export PYTHONPATH=$(pythonpath)
R=""; for f in ours torch torchc llama; do [ -f "$G/res/$f.json" ] && R="$R $G/res/$f.json"; done
"$PY" "$SRC/scripts/bench_decode.py" --device cuda --render $R --md "$OUT/BENCHMARKS.md" > /dev/null
tar czf "$OUT/res.tar.gz" -C "$G" res 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$G" logs 2>/dev/null
for d in m; do  # the sections measure.sh wrote
    [ -f "$G/$d/docs/BENCHMARKS.md" ] && cp "$G/$d/docs/BENCHMARKS.md" "$OUT/sections-$d.md"
done
cp "$G/check/gpu_check.txt" "$OUT/" 2>/dev/null
cat "$OUT/BENCHMARKS.md"; ls "$G"/*.done | xargs -n1 basename | tr '\n' ' '
