"""`python -m edge_runtime` = `edge-runtime`: for a tree used in place, without the installed
console script (the GPU benchmark machine runs the daemon from a carried source tree)."""

import sys

from edge_runtime.cli import main

sys.exit(main())
