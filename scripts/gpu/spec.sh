#!/bin/bash
# Speculative decoding on ONNX Runtime CUDA: the demo pair and the 8-layer pair, trained on a
# CPU machine and carried signed (.gpu/spec/{demo,pair}/{bundle,signing.pub}, which stage.sh
# copies to $G/spec). The section
# lands in $G/src/docs/BENCHMARKS.md (render.sh brings it back as spec.md).
. "$(dirname "$0")/env.sh"
export PYTHONPATH=$(pythonpath)
cd "$G/src" || exit 1
$LOCK timeout 400 $PIN_M "$PY" scripts/bench_speculative.py --device cuda --rounds 3 \
    --bundle "$G/spec/demo/bundle" --pubkey "$G/spec/demo/signing.pub" \
    --bundle "$G/spec/pair/bundle" --pubkey "$G/spec/pair/signing.pub" > "$G/logs/spec.log" 2>&1
echo "bench_speculative exit status $?" >> "$G/logs/spec.log"
touch "$G/spec.done"
