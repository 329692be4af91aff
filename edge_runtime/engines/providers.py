"""Which ONNX Runtime execution providers this machine really offers, and why one is missing.

On a Jetson the CPU wheel from PyPI silently replaces NVIDIA's onnxruntime-gpu build (both
install the module `onnxruntime`), and the daemon then runs on the CPU without a word. The
start-up line and `edge-runtime doctor` say which providers there are and, for each missing
GPU provider, the reason and the fix. No import of onnxruntime at module level: the base
install may not have it (it comes from the `[cpu]` extra or NVIDIA's index).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# The shared libraries each GPU provider loads when a session starts: present in the build
# but not loadable means the provider fails at the first session, not at import.
_NEEDS = {
    "TensorrtExecutionProvider": ("libnvinfer.so.10", "libnvinfer.so"),
    "CUDAExecutionProvider": ("libcudart.so.12", "libcudart.so.13", "libcudart.so"),
}
NOT_BUILT = "not in this build"
GPU_FIX = ("install onnxruntime-gpu from NVIDIA's Jetson index instead of the CPU wheel "
           "(README § Jetson)")


@dataclass
class ProviderReport:
    version: str | None  # None: onnxruntime is not installed
    offered: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # provider -> why, with the fix

    def line(self) -> str:
        if self.version is None:
            return ("ONNX Runtime: not installed: pip install 'edge-runtime[cpu]' (x86) or "
                    "onnxruntime-gpu from NVIDIA's Jetson index (README § Jetson)")
        parts = [f"ONNX Runtime {self.version} offers {', '.join(self.offered) or 'nothing'}"]
        parts += [f"{p}: {why}" for p, why in self.missing.items()]
        if any(why == NOT_BUILT for why in self.missing.values()):
            parts.append(f"for the GPU: {GPU_FIX}")
        return "; ".join(parts)


def _loadable(names: tuple[str, ...]) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def provider_report() -> ProviderReport:
    try:
        import onnxruntime as ort
    except ImportError:
        return ProviderReport(None)
    built = list(ort.get_available_providers())
    report = ProviderReport(str(ort.__version__))
    for p in built:
        libs = _NEEDS.get(p)
        if libs is not None and not _loadable(libs):
            report.missing[p] = (f"in this build but {libs[0]} cannot be loaded (install "
                                 "JetPack's CUDA/TensorRT libraries or fix LD_LIBRARY_PATH)")
        else:
            report.offered.append(p)
    for p in GPU_PROVIDERS:
        if p not in built:
            report.missing[p] = NOT_BUILT
    return report


def tensorrt_version() -> str | None:
    """TensorRT's Python module version (JetPack: python3-libnvinfer), None if absent."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)
