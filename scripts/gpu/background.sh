#!/bin/bash
# Started once (setsid) by the first call; runs across the calls while the machine is held.
# Builds (random checkpoints, our int4 bundles, fp16 ONNX, llama.cpp, GGUF) on cores 6-15;
# every GPU measurement takes $G/gpu.lock and runs on cores 0-5, one at a time, so that no
# two measurements share the GPU and no build takes their CPU.
. "$(dirname "$0")/env.sh"
rm -rf "$G/src" && cp -r "$SRC" "$G/src" && SRC=$G/src   # the code this run started with
export PYTHONPATH=$G/pipe:$SRC:$SRC/build:$SRC/scripts
BUILD="$PIN_B $PY $SRC/scripts/bench/gpu.py --workdir $W --llama-dir $G/llama.cpp"
# MODELS (default both) and COMPILE=0 (skip the torch.compile peer) shorten a run.
MODELS=${MODELS:-qwen2-0.5b qwen2-1.5b}
CSV=$(echo $MODELS | tr ' ' ',')
MEASURE="$LOCK $PIN_M $PY $SRC/scripts/bench_decode.py --device cuda --workdir $W --llama-dir $G/llama.cpp --models $CSV"
( $PIN_B bash "$SRC/scripts/gpu/llama_build.sh" > "$G/logs/llama_build.log" 2>&1 \
    && touch "$G/llama.done" ) &
for m in $MODELS; do
    ( $BUILD --models $m --prepare hf,int4,int4-fused,int4-fused-fp16 > "$G/logs/prep-$m.log" 2>&1 \
        && touch "$G/bundles-$m.done" || touch "$G/bundles-$m.failed" ) &
done
HF=""; for m in $MODELS; do HF="$HF $W/$m/hf-qwen2-0.5b-random"; done
( for d in $HF; do while [ ! -d "$d" ]; do sleep 3; done; done
  $LOCK $BUILD --models $CSV --prepare fp16 > "$G/logs/prep-fp16.log" 2>&1 && touch "$G/fp16.done" ) &
( for d in $HF; do while [ ! -d "$d" ]; do sleep 3; done; done
  $MEASURE --only torch-fp16 --child-timeout 240 --json "$G/res/torch.json" > "$G/logs/torch.log" 2>&1
  touch "$G/torch-eager.done"
  # torch.compile takes minutes of CPU: after ours has been measured (or 15 min at most)
  for i in $(seq 1 300); do [ -f "$G/ours.done" ] && break; sleep 3; done
  [ "${COMPILE:-1}" = 1 ] && $MEASURE --only torch-compile --batches 1 --child-timeout 200 --json "$G/res/torchc.json" > "$G/logs/torchc.log" 2>&1
  touch "$G/torch.done" ) &
( while [ ! -f "$G/llama.done" ]; do sleep 3; done
  $BUILD --models $CSV --prepare gguf > "$G/logs/prep-gguf.log" 2>&1 && touch "$G/gguf.done"
  $MEASURE --only llama.cpp --child-timeout 240 --json "$G/res/llama.json" > "$G/logs/llama.log" 2>&1
  touch "$G/llamabench.done" ) &
wait
touch "$G/background.done"
