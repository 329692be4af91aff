"""The one exception tree of the project.

    EdgeError                      anything this project raises on purpose
    ├── ConfigError                a bad configuration key or CLI value
    │   ├── AbortRuleError         a malformed `--abort-if` expression (names the bad token)
    │   └── RemoteConfigError      the fleet's config overlay sets a key only provisioning
    │                              may set, or is unreadable: ignored whole, never merged
    ├── BundleError                a model bundle that cannot be used
    │   ├── BundleIntegrityError   a file is missing, has the wrong size or the wrong SHA-256
    │   └── SignatureError         the manifest's signature is absent, malformed or wrong
    ├── EngineError                an inference engine failed to load or run a graph
    ├── GenerationError            a generation request that cannot be served as asked
    │   └── ContextLengthError     prompt + max_tokens exceed the model's context
    ├── OverloadedError            the device cannot take the request now; retry later
    ├── DeadlineExceededError      a locally served request reached its deadline before its
    │                              response was complete: generation stopped (HTTP 504)
    ├── OffloadError               the cloud path failed
    │   ├── OffloadUnavailableError  breaker open, broker unreachable or no cloud worker:
    │   │                            decided at once, never by waiting for a timeout
    │   ├── OffloadTimeoutError      no complete answer before the request's deadline
    │   └── OffloadRemoteError       a cloud worker answered with an error (its type, code)
    ├── BrokerError                the MQTT broker is unreachable or refused an operation
    ├── MessageError               a malformed MQTT payload, property set or topic id
    └── FleetError                 fleet management (device agent, bundle slots)
        ├── DeployError            a bundle could not be staged, switched to or rolled back;
        │   │                      the active bundle is left as it was
        │   ├── DiskSpaceError     not enough free space to stage a bundle (checked first)
        │   └── DownloadError      a bundle URL could not be fetched whole (HTTP status,
        │                          size or SHA-256 mismatch, retries exhausted)
        ├── CommandAuthError       a fleet command is unsigned, badly signed, expired,
        │                          replayed, aimed elsewhere or not allowed remotely
        ├── HealthCheckError       a freshly activated bundle failed its health check
        └── RolloutError           a staged rollout cannot be created, found or driven

The build side (`edge_build`) derives its own stage errors from `EdgeError` too, so a CLI can
catch one base class and print a clear message instead of a traceback.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(EdgeError):
    """A configuration value is missing, of the wrong type or out of range."""


class RemoteConfigError(ConfigError):
    """The remote-config overlay (fleet/remote_config.py) names a key outside REMOTE_KEYS or
    cannot be read: the daemon runs on its provisioned config alone and says why."""


class AbortRuleError(ConfigError):
    """An abort expression does not parse; `token` and `column` (1-based) point at it."""

    def __init__(self, message: str, token: str, column: int) -> None:
        super().__init__(message)
        self.token = token
        self.column = column


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
    """No path can serve the request in time: HTTP 429 (retry later) or 503 (the cloud path
    is down too, or the server is shutting down), with a Retry-After hint. `should_retry`
    False: retrying cannot help the caller (the API says `x-should-retry: false`)."""

    def __init__(
        self,
        message: str,
        retry_after_s: float = 1.0,
        status: int = 429,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status
        self.should_retry = should_retry


class DeadlineExceededError(EdgeError):
    """The request's deadline came before its response was complete; the engine loop stopped
    generating it (serving/engine_loop.py). HTTP 504, or an error event in a stream that has
    begun."""


class OffloadError(EdgeError):
    """The cloud offload path failed."""


class OffloadUnavailableError(OffloadError):
    """The cloud path is known to be down (breaker open, broker gone, nobody subscribed)."""


class OffloadTimeoutError(OffloadError):
    """The cloud did not finish answering before the request's deadline."""


class OffloadRemoteError(OffloadError):
    """A cloud worker answered with an error chunk; `type` and `code` are the worker's."""

    def __init__(self, message: str, type: str = "server_error", code: str | None = None) -> None:
        super().__init__(message)
        self.type = type
        self.code = code


class BrokerError(EdgeError):
    """Not connected to the MQTT broker, or it refused a publish/subscribe (mqtt/client.py)."""


class MessageError(EdgeError):
    """An MQTT payload, its properties or a topic id do not follow offload/messages.py,
    fleet/messages.py or mqtt/topics.py."""


class FleetError(EdgeError):
    """Fleet management failed: the device agent or its on-disk bundle slots."""


class DeployError(FleetError):
    """A bundle could not be staged, activated or rolled back; `active` is unchanged."""


class DiskSpaceError(DeployError):
    """Staging would not leave the required free space; nothing was written."""


class DownloadError(DeployError):
    """A bundle archive could not be downloaded whole; `active` is unchanged."""


class CommandAuthError(FleetError):
    """A fleet command the agent refuses before running it: no or a bad operator signature,
    expired, replayed, aimed at another device or group (fleet/command_auth.py)."""


class HealthCheckError(FleetError):
    """A newly activated bundle failed its health check; the agent rolls it back."""


class RolloutError(FleetError):
    """A staged rollout cannot be created, found, resumed or driven as asked."""
