#!/bin/bash
# Once the peers are done: one table of every result JSON (the GPU section of BENCHMARKS.md).
. "$(dirname "$0")/env.sh"
for i in $(seq 1 170); do [ -f "$G/torch.done" ] && [ -f "$G/llamabench.done" ] && break; sleep 3; done
export PYTHONPATH=$(pythonpath)
R=""; for f in ours torch torchc llama; do [ -f "$G/res/$f.json" ] && R="$R $G/res/$f.json"; done
"$PY" "$SRC/scripts/bench_decode.py" --device cuda --render $R --md "$OUT/BENCHMARKS.md" > /dev/null
tar czf "$OUT/res.tar.gz" -C "$G" res 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C "$G" logs 2>/dev/null
cat "$OUT/BENCHMARKS.md"
