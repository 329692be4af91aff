#!/bin/bash
# Ours (ORT CUDA int4: exported, fused, fused fp16) and ORT fp16 on both models.
. "$(dirname "$0")/env.sh"
for i in $(seq 1 60); do [ -f "$G/bundles-qwen2-1.5b.done" ] && [ -f "$G/fp16.done" ] && break; sleep 3; done
MODELS=qwen2-0.5b,qwen2-1.5b  # a model whose artifacts are still being built is left out
[ -f "$G/bundles-qwen2-1.5b.done" ] && [ -f "$G/fp16.done" ] || MODELS=qwen2-0.5b
echo "bench: models $MODELS"
export PYTHONPATH=$(pythonpath)
$LOCK timeout 500 $PIN_M "$PY" "$SRC/scripts/bench_decode.py" --device cuda --models $MODELS \
    --workdir "$W" --llama-dir "$G/llama.cpp" --only ours,ours-fused,ours-fused-fp16,ort-fp16 \
    --json "$G/res/ours.json" --child-timeout 150 2> "$G/logs/ours.log"
touch "$G/ours.done"
tar czf "$OUT/res.tar.gz" -C "$G" res 2>/dev/null
