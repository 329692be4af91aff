# Sourced by the scripts of scripts/gpu/: where things live on the GPU machine.
# The repo root is the current directory; .gpusrc/ is this branch's tree (carried), .gpu/ the
# small artifacts (wheels: transformers 4.57.6, optimum 2.1.0, optimum-onnx 0.1.0,
# tokenizers 0.22.2, huggingface_hub 0.36.2, cryptography 44.0.3 + cffi + pycparser, which the
# image lacks and edge_runtime imports; the daemon's and the benchmark client's: fastapi,
# starlette, uvicorn, pydantic(-core), annotated-types, typing-inspection, typing_extensions,
# opentelemetry-api, openai, httpx2, httpcore2, truststore, jiter, sniffio, distro,
# paho-mqtt, PyJWT, at CI's versions; mistral_common for llama.cpp's converter; the fp16
# demo bundle; llama.cpp source), .gpuw0-4/ the onnxruntime-gpu wheel in 5 pieces. A carried
# path that a later call does not name again is gone on the machine for that call: every
# call carries .gpusrc and what it reads (docs/BENCHMARKS.md, "GPU", says which).
G=/tmp/gpuw
REPO=$PWD
SRC=$PWD/.gpusrc
PY=/opt/torch/.venv/bin/python3
[ -x "$PY" ] || PY=python3
W=$G/work
export PYTHONUNBUFFERED=1
export PATH=/usr/local/cuda/bin:$PATH
mkdir -p "$G/pieces" "$G/logs" "$G/res" "$W"
pythonpath() {  # onnxruntime-gpu (once installed) first, then the pipeline's pinned wheels
    local p="$G/pipe:$SRC:$SRC/build:$SRC/scripts"
    [ -d "$G/ortgpu/onnxruntime" ] && p="$G/ortgpu:$p"
    echo "$p"
}
# Pin builds and measurements to separate cores, and serialise GPU measurements, where the
# tools exist (util-linux); without them, run unpinned / unlocked.
if command -v taskset >/dev/null; then PIN_M="taskset -c 0-5"; PIN_B="taskset -c 6-15"
else PIN_M=""; PIN_B=""; fi
if command -v flock >/dev/null; then LOCK="flock $G/gpu.lock"; else LOCK=""; fi
