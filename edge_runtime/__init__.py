"""On-device LLM daemon: verified bundles, ONNX Runtime / TensorRT engines, an OpenAI-compatible
API, and (in later modules) overload offload and fleet management over MQTT 5."""

from __future__ import annotations

from edge_runtime.bundle.manifest import Bundle, Manifest, verify_bundle, write_bundle
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
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.stream import Chunk, Completion

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
