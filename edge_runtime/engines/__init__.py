"""Inference engines behind one small protocol (protocol.py) and one loader (load.py).

    protocol.py   Engine, DeviceTensor: what the generator sees of a backend
    load.py       load_engine(bundle, graph) -> (Engine, GraphSpec): TensorRT when a plan
                  for this GPU exists, else ONNX Runtime
    ort.py        OrtEngine (TensorRT / CUDA / CPU execution providers)
    trt.py        TrtEngine (a TensorRT 10 plan; KV cache kept on the GPU)
    trt_plan.py   what a plan must look like for a graph (pure, no tensorrt)
    trt_cache.py  where plans live on a device, which graph a plan comes from
    trt_build.py  `edge-runtime build-engine`: build a plan on the device that runs it
    cuda_mem.py   device tensors, a buffer pool, pinned host buffers (cuda-python)

May import: bundle, atomic, errors. Never model/ or anything above it. tensorrt, cuda-python
and onnxruntime are imported inside the modules that need them, so the package imports on a
machine that has none of them.
"""
