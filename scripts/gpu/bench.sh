#!/bin/bash
# Ours (ORT CUDA int4: exported, fused, fused fp16) and ORT fp16, then one table of all.
. "$(dirname "$0")/env.sh"
for i in $(seq 1 60); do [ -f "$G/bundles-qwen2-1.5b.done" ] && [ -f "$G/fp16.done" ] && break; sleep 3; done
export PYTHONPATH=$(pythonpath)
$LOCK timeout 470 $PIN_M "$PY" "$SRC/scripts/bench_decode.py" --device cuda \
    --workdir "$W" --llama-dir "$G/llama.cpp" --only ours,ours-fused,ours-fused-fp16,ort-fp16 \
    --json "$G/res/ours.json" --child-timeout 150 2> "$G/logs/ours.log"
render() {
    R=""; for f in ours torch torchc llama; do [ -f "$G/res/$f.json" ] && R="$R $G/res/$f.json"; done
    "$PY" "$SRC/scripts/bench_decode.py" --device cuda --render $R --md "$OUT/BENCHMARKS.md" > /dev/null
    tar czf "$OUT/res.tar.gz" -C "$G" res 2>/dev/null
    tar czf "$OUT/logs.tar.gz" -C "$G" logs 2>/dev/null
}
render
cat "$OUT/BENCHMARKS.md"
