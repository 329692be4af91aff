"""The MQTT messages of cloud offload: typed, versioned, validated, in one module.

A request is the OpenAI request body itself (JSON), published on `edge/{device}/offload/req`
with its metadata in MQTT 5 properties, so any MQTT 5 client can call a cloud worker:

    ResponseTopic            edge/{device}/offload/res/{session}
    CorrelationData          the request id (bytes), echoed on every answer
    MessageExpiryInterval    the remaining deadline in whole seconds, rounded up, >= 1
    UserProperty             v=1, device, deadline_ms (absolute, Unix epoch ms),
                             stream=true|false, endpoint=chat|completions

The answer is a sequence of chunks on the response topic, each with the same CorrelationData:

    {"v": 1, "seq": 0, "text": "Hel", "finish_reason": null, "served_by": "cloud"}
    {"v": 1, "seq": 1, "text": "lo", "finish_reason": "stop", "served_by": "cloud",
     "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}

or, on failure, a last chunk with `"error": {"message", "type", "code"}`. A non-streamed
request gets exactly one chunk, which is what `mosquitto_rr` prints. The user properties are
optional on the way in (a hand-made `mosquitto_rr` call has none): the endpoint is then read
off the body, the deadline off the message expiry. Nothing here imports paho: `mqtt/props.py`
encodes `PublishProps` on the wire and decodes them (paho's own codec costs more than the
broker's whole round trip), `mqtt/client.py` hands them to paho.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import MessageError
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.types import PublishProps

SCHEMA_VERSION = 1
ENDPOINTS = ("chat", "completions")
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class OffloadRequest:
    body: Mapping[str, Any]
    """The OpenAI request body, unvalidated here: the worker runs the API's own models."""
    endpoint: str
    """`chat` (/v1/chat/completions) or `completions` (/v1/completions)."""
    device: str
    deadline_ms: int
    """Unix epoch milliseconds after which nobody waits for the answer."""
    stream: bool
    response_topic: str
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ErrorInfo:
    message: str
    type: str = "server_error"
    code: str | None = None


@dataclass(frozen=True)
class OffloadChunk:
    seq: int
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    served_by: str = "cloud"
    received_at: float = field(default=0.0, compare=False)
    """time.perf_counter() on arrival (set by the receiver; never on the wire)."""

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


def expiry_seconds(deadline_ms: int, now_ms: int) -> int:
    """MessageExpiryInterval for a deadline: whole seconds rounded up, at least 1."""
    return max(1, math.ceil((deadline_ms - now_ms) / 1000))


# -- requests ---------------------------------------------------------------------------------


def encode_request(req: OffloadRequest, now_ms: int) -> tuple[bytes, PublishProps]:
    if req.endpoint not in ENDPOINTS:
        raise MessageError(f"endpoint must be one of {ENDPOINTS}, got {req.endpoint!r}")
    topics.check_device(req.device)
    _check_topic(req.response_topic)
    payload = json.dumps(req.body, separators=(",", ":"), allow_nan=False).encode()
    props = PublishProps(
        response_topic=req.response_topic,
        correlation_data=req.correlation_data,
        message_expiry_s=expiry_seconds(req.deadline_ms, now_ms),
        user=(
            ("v", str(SCHEMA_VERSION)),
            ("device", req.device),
            ("deadline_ms", str(req.deadline_ms)),
            ("stream", "true" if req.stream else "false"),
            ("endpoint", req.endpoint),
        ),
    )
    return payload, props


def decode_request(
    topic: str, payload: bytes, props: PublishProps, now_ms: int, default_timeout_ms: int = 60_000
) -> OffloadRequest:
    """Validate a received request; MessageError says what is wrong with it."""
    if props.response_topic is None:
        raise MessageError("request has no ResponseTopic property: nowhere to answer")
    _check_topic(props.response_topic)
    _check_version(props.user_value("v"))
    device = topics.device_of(topic)
    claimed = props.user_value("device")
    if claimed is not None and claimed != device:
        # The topic is what the broker's ACL checked; a property cannot override it.
        raise MessageError(f"device property {claimed!r} does not match topic {topic!r}")
    body = _json_object(payload, "request")
    endpoint = props.user_value("endpoint") or ("chat" if "messages" in body else "completions")
    if endpoint not in ENDPOINTS:
        raise MessageError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
    deadline = props.user_value("deadline_ms")
    if deadline is not None:
        try:
            deadline_ms = int(deadline)
        except ValueError:
            raise MessageError(f"deadline_ms must be an integer, got {deadline!r}") from None
    elif props.message_expiry_s is not None:
        # The broker counts expiry down while the message waits, so this is still current.
        deadline_ms = now_ms + 1000 * props.message_expiry_s
    else:
        deadline_ms = now_ms + default_timeout_ms
    stream_prop = props.user_value("stream")
    if stream_prop not in (None, "true", "false"):
        raise MessageError(f"stream must be 'true' or 'false', got {stream_prop!r}")
    stream = stream_prop == "true" if stream_prop is not None else body.get("stream") is True
    return OffloadRequest(
        body=body,
        endpoint=endpoint,
        device=device,
        deadline_ms=deadline_ms,
        stream=stream,
        response_topic=props.response_topic,
        correlation_data=props.correlation_data,
    )


MAX_REQUEST_BYTES = 1 << 20
"""The largest request body a worker reads (1 MiB: ~250k tokens of prompt, far beyond any
context an edge model has); larger ones get a `request_too_large` error."""


@dataclass(frozen=True)
class Refusal:
    """Why a worker does not serve a request: the counter it bumps, the error, and whether
    an error reply can (and may) be sent to the request's ResponseTopic."""

    counter: str
    error: ErrorInfo
    reply: bool


def screen_request(topic: str, payload_size: int, props: PublishProps,
                   max_bytes: int = MAX_REQUEST_BYTES) -> Refusal | None:
    """What must happen to a received request before it is decoded: None (go on), or a
    Refusal. A request whose ResponseTopic is missing (an MQTT 3.1.1 publisher has no
    properties) or is not this device's own response topic is never answered: there is
    nowhere, or nowhere allowed, to answer to (topics.check_response_topic). Every other
    refusal is answered with an error chunk."""
    if props.response_topic is None:
        return Refusal("no_response_topic", ErrorInfo(
            "request has no ResponseTopic (an MQTT 3.1.1 client, or a v5 client that did not "
            "set one): nowhere to answer; publish with MQTT 5 and a ResponseTopic of "
            "edge/{device}/offload/res/{session}", "invalid_request_error",
            "no_response_topic"), reply=False)
    try:
        topics.check_response_topic(topic, props.response_topic)
    except MessageError as e:
        return Refusal("foreign_topic", ErrorInfo(str(e), "invalid_request_error",
                                                  "foreign_response_topic"), reply=False)
    v = props.user_value("v")
    if v is not None and v != str(SCHEMA_VERSION):
        return Refusal("bad_version", ErrorInfo(
            f"unsupported schema version {v!r}; this worker speaks {SCHEMA_VERSION}",
            "invalid_request_error", "unsupported_version"), reply=True)
    if payload_size > max_bytes:
        return Refusal("too_large", ErrorInfo(
            f"request body of {payload_size} bytes is over this worker's limit of "
            f"{max_bytes}", "invalid_request_error", "request_too_large"), reply=True)
    return None


def model_refusal(body: Mapping[str, Any], served: str | None) -> Refusal | None:
    """A request for a model this worker does not serve (the API's 404), or None; `served`
    None serves any name (a worker started without a bundle name, the echo worker)."""
    if served is None or body.get("model") == served:
        return None
    return Refusal("unknown_model", ErrorInfo(
        f"model {body.get('model')!r} does not exist; this worker serves {served!r}",
        "invalid_request_error", "model_not_found"), reply=True)


# -- responses --------------------------------------------------------------------------------


def response_props(correlation_data: bytes | None) -> PublishProps:
    return PublishProps(correlation_data=correlation_data, user=(("v", str(SCHEMA_VERSION)),))


def encode_chunk(chunk: OffloadChunk) -> bytes:
    if chunk.finish_reason not in (None, *FINISH_REASONS):
        raise MessageError(f"finish_reason must be one of {FINISH_REASONS} or null")
    d: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "seq": chunk.seq,
        "text": chunk.text,
        "finish_reason": chunk.finish_reason,
        "served_by": chunk.served_by,
    }
    if chunk.usage is not None:
        u = chunk.usage
        d["usage"] = {
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens,
        }
    if chunk.error is not None:
        d["error"] = {"message": chunk.error.message, "type": chunk.error.type,
                      "code": chunk.error.code}
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode()


def decode_chunk(payload: bytes, received_at: float = 0.0) -> OffloadChunk:
    d = _json_object(payload, "response chunk")
    _check_version(d.get("v"))
    seq, text, finish = d.get("seq"), d.get("text", ""), d.get("finish_reason")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise MessageError(f"chunk seq must be an integer >= 0, got {seq!r}")
    if not isinstance(text, str):
        raise MessageError(f"chunk text must be a string, got {text!r}")
    if finish not in (None, *FINISH_REASONS):
        raise MessageError(f"chunk finish_reason must be null or one of {FINISH_REASONS}")
    served_by = d.get("served_by", "cloud")
    if not isinstance(served_by, str):
        raise MessageError(f"chunk served_by must be a string, got {served_by!r}")
    usage = None
    if d.get("usage") is not None:
        u = d["usage"]
        fields = ("prompt_tokens", "completion_tokens")
        if not isinstance(u, dict) or not all(_is_int(u.get(f)) and u[f] >= 0 for f in fields):
            raise MessageError(f"chunk usage must hold non-negative {fields}, got {u!r}")
        usage = Usage(u["prompt_tokens"], u["completion_tokens"])
    error = None
    if d.get("error") is not None:
        e = d["error"]
        if not (isinstance(e, dict) and isinstance(e.get("message"), str)
                and isinstance(e.get("type", ""), str)
                and isinstance(e.get("code"), (str, type(None)))):
            raise MessageError(f"chunk error must be {{message, type, code}}, got {e!r}")
        error = ErrorInfo(e["message"], e.get("type") or "server_error", e.get("code"))
    if finish is not None and usage is None and error is None:
        raise MessageError("the last chunk (finish_reason set) must carry usage")
    return OffloadChunk(seq, text, finish, usage, error, served_by, received_at)


# -- helpers ----------------------------------------------------------------------------------


def _json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MessageError(f"{what} payload is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise MessageError(f"{what} payload must be a JSON object, got {type(d).__name__}")
    return d


def _check_version(v: object) -> None:
    # Absent means 1: the first schema, and what a hand-written request implies.
    if v is not None and str(v) != str(SCHEMA_VERSION):
        raise MessageError(f"unsupported schema version {v!r}; this side speaks {SCHEMA_VERSION}")


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise MessageError(f"response topic {topic!r} must be a non-empty topic without wildcards")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
