#!/bin/bash
# Every call starts here: take what this call carried, install what can be installed.
#   bash .gpusrc/scripts/gpu/stage.sh
. "$(dirname "$0")/env.sh"
for d in .gpuw0 .gpuw1 .gpuw2 .gpuw3 .gpuw4; do
    [ -d "$d" ] && cp -n "$d"/ortpiece.* "$G/pieces/" 2>/dev/null
    [ -d "$d" ] && cp -n "$d"/*.whl "$G/" 2>/dev/null
done
if [ ! -d "$G/pipe/transformers" ] && [ -d .gpu/whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$G/pipe" \
        .gpu/whl/*.whl && echo "stage: pipeline wheels installed"
fi
if [ ! -d "$G/pipe/mistral_common" ] && ls "$G"/mistral_common-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$G/pipe" \
        "$G"/mistral_common-*.whl && echo "stage: mistral_common installed"
fi
# Bundles carried by a call stay in $G for later calls (a carried path not named again is gone).
for d in demo demo16 spec spec16; do [ -d ".gpu/$d" ] && mkdir -p "$G/$d" && cp -r ".gpu/$d/." "$G/$d/"; done
n=$(ls "$G/pieces" | wc -l)
echo "stage: $n of 5 onnxruntime-gpu pieces here"
if [ ! -d "$G/ortgpu/onnxruntime" ] && [ "$n" -eq 5 ]; then
    whl=$G/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
    cat "$G"/pieces/ortpiece.0 "$G"/pieces/ortpiece.1 "$G"/pieces/ortpiece.2 \
        "$G"/pieces/ortpiece.3 "$G"/pieces/ortpiece.4 > "$whl"
    want=$(cut -d' ' -f1 "$(dirname "$0")/ortgpu.sha256")  # tracked: travels with .gpusrc
    got=$(sha256sum "$whl" | cut -d' ' -f1)
    echo "stage: onnxruntime-gpu wheel sha256 $got (expected $want)"
    if [ "$got" = "$want" ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$G/ortgpu" "$whl" && echo "stage: onnxruntime-gpu installed in $G/ortgpu"
    else
        echo "stage: SHA-256 MISMATCH, not installed"
    fi
fi
ls "$G"/*.done 2>/dev/null | xargs -r -n1 basename | tr '\n' ' '; echo
