"""What the offline pipeline needs beyond the device's base install, checked up front.

A device install (`pip install edge-runtime`, no extras) has no torch, transformers or rich;
a command of the pipeline run there must say so in one line with the fix instead of a
ModuleNotFoundError traceback minutes into a build. Also: progress in the logs when stderr
is not a terminal (rich draws nothing there, and a first build takes minutes).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time

from edge_build.stage import StageError

# Import name -> distribution, for the [build] extra (pyproject.toml).
BUILD_MODULES = {
    "torch": "torch",
    "transformers": "transformers",
    "optimum": "optimum",
    "onnx": "onnx",
    "rich": "rich",
}
INSTALL_HINT = "pip install 'edge-runtime[build]' (on a CPU machine: torch==2.13.0 first)"

progress_log = logging.getLogger("edge_build.progress")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as missing
        return False


def missing_build_modules() -> list[str]:
    return [name for name in BUILD_MODULES if not _importable(name)]


def require_build_extra(what: str) -> None:
    missing = missing_build_modules()
    if missing:
        raise StageError(f"{what} needs the offline pipeline's packages (missing: "
                         f"{', '.join(missing)}): {INSTALL_HINT}")


def missing_module_hint(e: ModuleNotFoundError) -> str:
    """One line for an optional module found missing only at run time."""
    name = (e.name or "?").split(".")[0]
    if name in BUILD_MODULES:
        return f"the module {name!r} is not installed: {INSTALL_HINT}"
    if name == "onnxruntime":
        return ("ONNX Runtime is not installed: pip install 'edge-runtime[cpu]' (x86), or "
                "onnxruntime-gpu from NVIDIA's Jetson index (README § Jetson)")
    return f"the module {name!r} is not installed: pip install {name}"


class LogProgress:
    """Logs `name step/total` about every tenth of the way when stderr is not a terminal
    (where rich's bar is drawn instead)."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total = name, max(1, total)
        self.on = not sys.stderr.isatty()
        self._next = 0.0
        self._started = time.monotonic()

    def update(self, done: int, info: str = "") -> None:
        if not self.on or (done < self._next and done < self.total):
            return
        self._next = done + self.total / 10
        elapsed = time.monotonic() - self._started
        progress_log.info("%s %d/%d (%.0f s) %s", self.name, done, self.total, elapsed, info)
