#!/bin/bash
# Started once (setsid) by the call that installs onnxruntime-gpu: every measurement on ONNX
# Runtime's CUDA provider, one after another under the GPU lock, the most wanted first (a
# lease that ends early keeps what finished). Each step leaves its log in $G/logs and a
# .done; sections of docs/BENCHMARKS.md land in $G/m/docs (render.sh brings them back).
#   MODELS (default both) as for background.sh; bundles carried: .gpu/demo16 (the demo recipe
#   with fuse.activations = "float16": bundle/, signing.pub) and .gpu/spec16/pair (the same
#   for models/speculative-pair.toml).
. "$(dirname "$0")/env.sh"
rm -rf "$G/m" && cp -r "$SRC" "$G/m" && SRC=$G/m   # this call's tree (background.sh has its own)
export PYTHONPATH=$(pythonpath)
MODELS=${MODELS:-qwen2-0.5b qwen2-1.5b}
CSV=$(echo $MODELS | tr ' ' ',')
# The daemon loads CUDA without torch: the CUDA/cuDNN libraries of the image's pip packages
# (nvidia-*) go on the loader path, as a system CUDA install would be on a Jetson.
NVLIBS=$("$PY" - <<'PY'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = {os.path.dirname(f) for base in nvidia.__path__
        for f in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
PY
)
wait_for() { for i in $(seq 1 "$2"); do [ -f "$G/$1" ] && return 0; sleep 3; done; return 1; }
step() { echo "$(date +%T) $1" >> "$G/logs/measure.log"; }
cd "$SRC" || exit 1

step "gpu_check"
wait_for bundles-qwen2-0.5b.done 200 || wait_for bundles-qwen2-0.5b.failed 1
mkdir -p "$G/check"
$LOCK timeout 480 $PIN_M "$PY" scripts/gpu_check.py --demo "$G/demo16/bundle" \
    --demo-pubkey "$G/demo16/signing.pub" --qwen-workdir "$W/qwen2-0.5b" --out "$G/check" \
    > "$G/logs/check.log" 2>&1
echo "gpu_check exit status $?" >> "$G/logs/check.log"; touch "$G/check.done"

step "bench_concurrency"
LD_LIBRARY_PATH=$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} $LOCK timeout 560 $PIN_M "$PY" \
    scripts/bench_concurrency.py --device cuda --demo-bundle "$G/demo16/bundle" \
    --demo-pubkey "$G/demo16/signing.pub" --workdir "$W/qwen2-0.5b" > "$G/logs/concurrency.log" 2>&1
echo "bench_concurrency exit status $?" >> "$G/logs/concurrency.log"; touch "$G/concurrency.done"

step "bench_speculative"
$LOCK timeout 420 $PIN_M "$PY" scripts/bench_speculative.py --device cuda --rounds 3 \
    --bundle "$G/demo16/bundle" --pubkey "$G/demo16/signing.pub" \
    --bundle "$G/spec16/pair/bundle" --pubkey "$G/spec16/pair/signing.pub" > "$G/logs/spec.log" 2>&1
echo "bench_speculative exit status $?" >> "$G/logs/spec.log"; touch "$G/spec.done"

step "bench_decode ours"
wait_for fp16.done 100
$LOCK timeout 500 $PIN_M "$PY" scripts/bench_decode.py --device cuda --models "$CSV" \
    --workdir "$W" --only ours,ours-fused,ours-fused-fp16,ort-fp16 \
    --json "$G/res/ours.json" --child-timeout 150 > "$G/logs/ours.log" 2>&1
touch "$G/ours.done"

step "capacity"
for b in "$G/demo16/bundle $G/demo16/signing.pub" \
         "$W/qwen2-0.5b/bundle-int4-b128-acc4-fused-fp16 $W/qwen2-0.5b/keys/bench.pub"; do
    set -- $b
    $LOCK timeout 200 $PIN_M "$PY" "$SRC/scripts/gpu/capacity.py" --bundle "$1" --pubkey "$2" \
        >> "$G/logs/capacity.log" 2>&1
done
touch "$G/capacity.done"
step "done"
touch "$G/measure.done"
