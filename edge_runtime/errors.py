"""The one exception tree of the project.

    EdgeError                      anything this project raises on purpose
    ├── ConfigError                a bad configuration key or CLI value
    ├── BundleError                a model bundle that cannot be used
    │   ├── BundleIntegrityError   a file is missing, has the wrong size or the wrong SHA-256
    │   └── SignatureError         the manifest's signature is absent, malformed or wrong
    ├── EngineError                an inference engine failed to load or run a graph
    ├── GenerationError            a generation request that cannot be served as asked
    │   └── ContextLengthError     prompt + max_tokens exceed the model's context
    ├── OverloadedError            the device cannot take the request now; retry later
    └── OffloadError               the cloud path failed (later issues)

The build side (`edge_build`) derives its own stage errors from `EdgeError` too, so a CLI can
catch one base class and print a clear message instead of a traceback.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(EdgeError):
    """A configuration value is missing, of the wrong type or out of range."""


class BundleError(EdgeError):
    """A model bundle is malformed or unusable."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, truncated or altered; `path` names it."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class SignatureError(BundleError):
    """The manifest signature is missing, malformed or does not verify."""


class EngineError(EdgeError):
    """An inference engine failed to load or run a graph."""


class GenerationError(EdgeError):
    """A generation request cannot be served as asked; `field` names the culprit."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthError(GenerationError):
    """Prompt tokens plus requested new tokens exceed the model's context length."""


class OverloadedError(EdgeError):
    """The request queue is full or the request waited past its deadline (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OffloadError(EdgeError):
    """The cloud offload path failed."""
