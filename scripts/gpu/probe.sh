#!/bin/bash
# The machine as found: GPU, driver, toolchain, Python packages, ONNX Runtime's providers.
. "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
nvcc --version | tail -2; cmake --version | head -1; nproc; free -g | head -2
PYTHONPATH=$(pythonpath) "$PY" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
import torch
print("torch", torch.__version__, torch.cuda.get_device_name(0))
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
# The pipeline's modules, then the daemon's and the benchmark client's (bench_concurrency
# runs a real `edge-runtime serve`): a missing one is named here, not minutes later.
for m in ("transformers", "optimum", "tokenizers", "huggingface_hub", "onnx", "numpy",
          "fastapi", "uvicorn", "pydantic", "openai", "paho.mqtt", "jwt", "cryptography",
          "prometheus_client", "edge_runtime.cli", "edge_runtime.api.app"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:
        print(m, "FAILED", e)
from cuda.bindings import runtime
print("cuda-python runtime", runtime.cudaRuntimeGetVersion())
PY
