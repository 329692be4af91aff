#!/bin/bash
# A short session: cuda_mem on the GPU, then the PyTorch fp16 peer (no onnxruntime-gpu).
. "$(dirname "$0")/env.sh"
[ -d "$G/pipe/transformers" ] || "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target "$G/pipe" .gpu/whl/*.whl
export PYTHONPATH=$G/pipe:$SRC:$SRC/build:$SRC/scripts
CUDA_MODULE_LOADING=LAZY timeout 60 "$PY" "$SRC/scripts/gpu_check.py" --cuda-mem-only
timeout 150 "$PY" "$SRC/scripts/bench_decode.py" --device cuda --workdir "$W" --only torch-fp16 \
    --models qwen2-0.5b --child-timeout 140 --json "$OUT/torch.json" 2> "$OUT/torch.err"
