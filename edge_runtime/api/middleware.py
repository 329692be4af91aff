"""Pure ASGI middleware, outermost first:

    RequestContextMiddleware   request id, `x-served-by`, metrics, access log, catch-all 500
    GuardMiddleware            Host and Origin allowlists, CORS preflight (guard.py)
    AuthMiddleware             API key or JWT on /v1/*, /metrics and the docs (when set)
    BodyLimitMiddleware        413 for bodies over the limit, then body.py's checks (415 for
                               anything but application/json, 400 for JSON Python cannot
                               carry), before anything parses them

Pure ASGI rather than Starlette's BaseHTTPMiddleware: these wrap streamed (SSE) responses,
which BaseHTTPMiddleware buffers through an extra task and memory stream.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_runtime.api.accesslog import AccessLog
from edge_runtime.api.auth import Authenticator, AuthError, Principal
from edge_runtime.api.body import check_body
from edge_runtime.api.errors import SERVER_ERROR, APIError
from edge_runtime.api.metrics import Metrics

log = logging.getLogger(__name__)

CONTEXT_KEY = "edge_runtime.context"
CLIENT_GONE = 499
"""nginx's "client closed request": the client left before its response was complete."""
AUTH_KEY = "edge_runtime.auth"
# A client may bring its own request id (for tracing across services) if it is short and tame.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass
class RequestContext:
    """What a handler learns about a request that the access log and metrics report."""

    id: str
    served_by: str = "local"
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    bundle_version: str | None = None
    """The version of the bundle whose model generated the response (`x-bundle-version`)."""
    arrived: float = field(default_factory=time.perf_counter)
    """When the app first saw the request (its headers parsed, its body not yet read):
    where a client's latency budget starts counting (api/completions.py)."""


def request_context(scope: Scope) -> RequestContext:
    ctx = scope.get(CONTEXT_KEY)
    assert isinstance(ctx, RequestContext), "RequestContextMiddleware is not installed"
    return ctx


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: AccessLog | None) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = header(scope, b"x-request-id")
        ctx = RequestContext(id=given if given and _CLIENT_ID.match(given) else uuid.uuid4().hex)
        scope[CONTEXT_KEY] = ctx
        status = 0
        complete = False  # the response's last body message was sent
        failed = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            if message["type"] == "http.response.start":
                status = message["status"]
                # Read served_by now, not earlier: the handler decides it before responding.
                headers = [
                    *message.get("headers", []),
                    (b"x-request-id", ctx.id.encode("latin-1")),
                    (b"x-served-by", ctx.served_by.encode("latin-1")),
                ]
                if ctx.bundle_version is not None:
                    headers.append((b"x-bundle-version", ctx.bundle_version.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as e:
            failed = True
            # The catch-all: a bug must give the client a JSON 500, never a bare close.
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            ctx.error = "internal_error"
            if status == 0:
                err = APIError(500, f"internal server error ({type(e).__name__})", SERVER_ERROR)
                await err.response()(scope, receive, send_with_headers)
            # Else the response had started: all we can do is cut it short, and log it.
        finally:
            seconds = time.perf_counter() - t0
            if status and not complete and not failed:
                # A response begun and never finished without an error of ours: the client
                # went away mid-stream. Not a 200: it did not get its answer (tokens so far
                # are in completion_tokens).
                status, ctx.error = CLIENT_GONE, ctx.error or "client_disconnected"
            self.metrics.observe_request(scope["path"], status or CLIENT_GONE, ctx.served_by,
                                         seconds)
            if self.access_log is not None:
                self.access_log.write(_record(scope, ctx, status, seconds))


def _record(scope: Scope, ctx: RequestContext, status: int, seconds: float) -> dict[str, Any]:
    client = scope.get("client")
    return {
        "request_id": ctx.id,
        "client": f"{client[0]}:{client[1]}" if client else None,
        "method": scope["method"],
        "path": scope["path"],
        "model": ctx.model,
        "bundle_version": ctx.bundle_version,
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "served_by": ctx.served_by,
        # 499 (nginx's "client closed request"): the client left before its response ended.
        "status": status or CLIENT_GONE,
        "latency_ms": round(seconds * 1000, 2),
        "error": ctx.error,
    }


class AuthMiddleware:
    """`Authorization: Bearer <API key or JWT>` on protected paths (auth.py says which
    credentials count). Health checks stay open; /readyz reads `scope[AUTH_KEY]` to decide
    whether to show details, so a credential is checked, never required, there."""

    def __init__(
        self,
        app: ASGIApp,
        auth: Authenticator,
        protected: tuple[str, ...] = ("/v1", "/metrics"),
    ) -> None:
        self.app = app
        self.auth = auth
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = header(scope, b"authorization")
        must = scope["path"].startswith(self.protected)
        if must or given is not None:
            try:
                scope[AUTH_KEY] = self.auth.authenticate(given)
            except AuthError as e:
                if must:
                    err = APIError(
                        401, str(e), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                    )
                    note_error(scope, err)
                    await err.response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def authenticated(scope: Scope) -> Principal | None:
    """The caller AuthMiddleware accepted, if any."""
    principal = scope.get(AUTH_KEY)
    return principal if isinstance(principal, Principal) else None


def note_error(scope: Scope, err: APIError) -> None:
    """Record a refusal's code for the access log."""
    ctx = scope.get(CONTEXT_KEY)
    if isinstance(ctx, RequestContext):
        ctx.error = err.code or err.type


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes, by Content-Length and by counting what arrives.

    The body is read here in full (it is at most `limit` bytes) and replayed to the app, so a
    chunked upload without Content-Length is held to the same limit. Before answering 413 the
    rest of the upload is read and dropped (up to `drain_limit`): a client still writing its
    body when the server closes would see a reset instead of the 413.
    """

    def __init__(self, app: ASGIApp, limit: int, drain_limit: int = 16 << 20) -> None:
        self.app = app
        self.limit = limit
        self.drain_limit = max(drain_limit, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks: list[bytes] = []
        size = 0
        more = True  # whether the client has more body to send
        while more and not too_large:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left mid-upload; there is nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            too_large = size > self.limit
            chunks.append(chunk)
        if too_large:
            await self._drain(receive, size, more_body=more)
            err = APIError(
                413,
                f"request body exceeds the limit of {self.limit} bytes",
                param=None,
                code="request_too_large",
            )
            note_error(scope, err)
            await err.response()(scope, receive, send)
            return
        body = b"".join(chunks)
        refusal = check_body(scope["method"], header(scope, b"content-type"), body)
        if refusal is not None:
            note_error(scope, refusal)
            await refusal.response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, when it comes

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, size: int, more_body: bool) -> None:
        while more_body and size <= self.drain_limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more_body = message.get("more_body", False)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None
