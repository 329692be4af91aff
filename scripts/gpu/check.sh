#!/bin/bash
# gpu_check.py on the demo bundle and the Qwen2-0.5B-shape bundles, once they exist.
. "$(dirname "$0")/env.sh"
# (done or failed: on 2026-12-05 a failed build, a missing wheel, cost 5 min of waiting here)
for i in $(seq 1 100); do
    [ -f "$G/bundles-qwen2-0.5b.done" ] || [ -f "$G/bundles-qwen2-0.5b.failed" ] && break; sleep 3
done
export PYTHONPATH=$(pythonpath)
mkdir -p "$G/check"
$LOCK timeout 420 "$PY" "$SRC/scripts/gpu_check.py" --demo "$G/demo/bundle" \
    --demo-pubkey "$G/demo/signing.pub" --qwen-workdir "$W/qwen2-0.5b" --out "$G/check"
echo "gpu_check exit status $?"
cp "$G/check/gpu_check.txt" "$OUT/" 2>/dev/null
tar czf "$OUT/check-profiles.tar.gz" -C "$G/check" . 2>/dev/null
exit 0
