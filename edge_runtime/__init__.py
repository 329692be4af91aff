"""On-device LLM daemon: verified bundles, ONNX Runtime / TensorRT engines, an OpenAI-compatible
API, and (in later modules) overload offload and fleet management over MQTT 5."""

from __future__ import annotations

from edge_runtime.bundle import Bundle, Manifest, verify_bundle, write_bundle
from edge_runtime.errors import (
    BundleError,
    BundleIntegrityError,
    ConfigError,
    ContextLengthError,
    EdgeError,
    EngineError,
    GenerationError,
    OffloadError,
    OverloadedError,
    SignatureError,
)
from edge_runtime.generator import Chunk, Completion, Generator
from edge_runtime.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "Chunk",
    "Completion",
    "ConfigError",
    "ContextLengthError",
    "EdgeError",
    "EngineError",
    "GenerationError",
    "Generator",
    "Manifest",
    "OffloadError",
    "OverloadedError",
    "SamplingParams",
    "SignatureError",
    "__version__",
    "verify_bundle",
    "write_bundle",
]
