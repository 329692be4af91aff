#!/bin/bash
# llama.cpp (the tree vendored by llama-cpp-python 0.3.16, trimmed; .gpu/llama.cpp-*.tar.gz)
# built with CUDA for sm_90: only llama-bench, llama-batched-bench and llama-quantize.
. "$(dirname "$0")/env.sh"
set -e
cd "$G"
rm -rf llama.cpp && tar xzf "$REPO/.gpu/llama.cpp-0.3.16.tar.gz"
cd llama.cpp
cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
time cmake --build build -j 12 --target llama-bench llama-batched-bench llama-quantize
ls -la build/bin
