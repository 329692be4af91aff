"""Run the fuse stage on the bench int4 graph (~/.cache/edge-bench) into a scratch directory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edge_build import fuse

src = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/edge-bench/onnx-int4-b128-acc4")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/fuse/int4-fused")
t0 = time.time()
rec = fuse.run(src.expanduser(), out)
print(json.dumps(rec["metrics"], indent=1), f"{time.time() - t0:.1f}s")
