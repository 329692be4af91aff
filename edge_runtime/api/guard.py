"""Who may reach the API through a browser: the Host and Origin checks (pure ASGI).

A web page cannot read a loopback service's answers, but it can make the browser send it
requests. Two ways matter, and each has its check here:

    DNS rebinding    a page on attacker.example re-points its own name at 127.0.0.1; the
                     browser then thinks the daemon is attacker.example (same origin) and
                     lets the page read everything. Its requests carry `Host:
                     attacker.example:8000`: only the names this daemon answers to pass
                     (the loopback names when bound to loopback, server.allowed_hosts).
    cross-site calls a page's fetch() or form POST carries an `Origin` header. Such a request
                     is served only for the daemon's own origin (its /docs page) or an origin
                     in server.cors_origins (with the CORS
                     headers a browser needs, and preflight answered here); any other Origin
                     gets 403 before the app sees it. body.py requires application/json, so
                     a browser always asks first (preflight) and never sends a "simple" POST.

Clients that are not browsers (curl, the openai client, other services) send no Origin and
the Host they dialled, and see no difference.
"""

from __future__ import annotations

import ssl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_runtime.api.errors import APIError
from edge_runtime.api.middleware import header, note_error
from edge_runtime.config import ServerConfig
from edge_runtime.errors import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
CORS_METHODS = ("GET", "POST")
CORS_HEADERS = ("authorization", "content-type", "x-request-id", "x-request-deadline-ms")
EXPOSED_HEADERS = (
    "x-request-id, x-served-by, x-bundle-version, retry-after, retry-after-ms, x-should-retry"
)
PREFLIGHT_MAX_AGE_S = 600


def allowed_hosts(server: ServerConfig) -> frozenset[str] | None:
    """The host names a request's Host header may carry; None: any (no check)."""
    names = {normalize_host(h) or h for h in server.allowed_hosts}
    if "*" in names:
        return None
    wildcard = server.host in WILDCARDS
    if server.is_loopback or wildcard:  # a wildcard bind listens on loopback too
        names |= LOOPBACK_NAMES
    if not server.is_loopback and not wildcard:
        names.add(normalize_host(server.host) or server.host)
    if wildcard and not server.allowed_hosts:
        return None  # which names reach 0.0.0.0 is unknowable; cli.py warns at start-up
    return frozenset(names)


def check_tls(server: ServerConfig) -> None:
    """ConfigError, at start-up, for a certificate and key that uvicorn could not load."""
    if server.tls_cert_file is None or server.tls_key_file is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            server.tls_cert_file, server.tls_key_file
        )
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"cannot load server.tls_cert_file {server.tls_cert_file} with "
            f"server.tls_key_file {server.tls_key_file}: {e}"
        ) from e


def exposure_warnings(server: ServerConfig) -> list[str]:
    """What is open to whoever reaches the address, for the start-up log."""
    out = []
    open_api = server.resolved_api_key() is None and server.jwt_public_key_file is None
    if not server.is_loopback and open_api:
        out.append(
            f"binding {server.host} without an API key: anyone who can reach this address can "
            "use the model (set --api-key-file or server.api_key_file)"
        )
    if allowed_hosts(server) is None:
        out.append(
            f"binding {server.host} with no server.allowed_hosts: the Host header is not "
            "checked (DNS rebinding); list the names clients use"
        )
    return out


def normalize_host(value: str) -> str | None:
    """`Example.COM:8000` → `example.com`, `[::1]:80` → `[::1]`, `::1` → `[::1]`; None when
    it is no host (garbage after the name, an empty name)."""
    v = value.strip().lower()
    if v.count(":") > 1 and not v.startswith("["):
        v = f"[{v}]"  # a bare IPv6 address (configured, never a Host header)
    if v.startswith("["):
        end = v.find("]")
        if end < 0:
            return None
        name, rest = v[: end + 1], v[end + 1 :]
    else:
        name, sep, port = v.partition(":")
        rest = sep + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    name = name.rstrip(".")
    return name or None


def normalize_origin(value: str) -> str:
    return value.strip().lower().rstrip("/")


class GuardMiddleware:
    def __init__(
        self, app: ASGIApp, hosts: frozenset[str] | None, origins: frozenset[str]
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(normalize_origin(o) for o in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = header(scope, b"host")
        err = self._check_host(host)
        origin = header(scope, b"origin")
        if err is None and origin is not None and self._same_origin(scope, origin, host):
            origin = None  # the daemon's own pages (/docs): a Host that passed, so no rebinding
        if err is None and origin is not None:
            err = self._check_origin(origin)
        if err is None and origin is not None and scope["method"] == "OPTIONS":
            method = header(scope, b"access-control-request-method")
            if method is not None:
                asked = header(scope, b"access-control-request-headers")
                err = self._check_preflight(method, asked)
                if err is None:
                    await _preflight_ok(origin, send)
                    return
        if err is not None:
            note_error(scope, err)
            await err.response()(scope, receive, send)
            return
        if origin is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *_cors_headers(origin)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _same_origin(self, scope: Scope, origin: str, host: str | None) -> bool:
        """Whether `origin` is this server as the client reached it. Only trusted while Host
        is checked: without that check a rebinding page's origin matches its Host too."""
        if self.hosts is None or host is None:
            return False
        return normalize_origin(origin) == f"{scope.get('scheme', 'http')}://{host.lower()}"

    def _check_host(self, host: str | None) -> APIError | None:
        if self.hosts is None:
            return None
        if host is None:
            return APIError(400, "the request has no Host header", code="host_not_allowed")
        if normalize_host(host) in self.hosts:
            return None
        shown = host if len(host) <= 100 else host[:100] + "…"
        return APIError(
            400,
            f"Host {shown!r} is not a name of this server (it answers to "
            f"{', '.join(sorted(self.hosts))}; add names to server.allowed_hosts). A foreign "
            "Host is how DNS rebinding lets a web page reach a local service",
            code="host_not_allowed",
        )

    def _check_origin(self, origin: str) -> APIError | None:
        if normalize_origin(origin) in self.origins:
            return None
        shown = origin if len(origin) <= 100 else origin[:100] + "…"
        allowed = ", ".join(sorted(self.origins)) or "none"
        return APIError(
            403,
            f"cross-origin request from {shown!r} refused: browsers may call this API only "
            f"from the origins in server.cors_origins ({allowed})",
            code="origin_not_allowed",
        )

    def _check_preflight(self, method: str, requested: str | None) -> APIError | None:
        if method.upper() not in CORS_METHODS:
            return APIError(
                403, f"CORS preflight: method {method!r} is not allowed (allowed: "
                f"{', '.join(CORS_METHODS)})", code="origin_not_allowed"
            )
        names = [h.strip().lower() for h in (requested or "").split(",") if h.strip()]
        extra = [h for h in names if h not in CORS_HEADERS]
        if extra:
            return APIError(
                403, f"CORS preflight: header(s) {', '.join(extra)} not allowed (allowed: "
                f"{', '.join(CORS_HEADERS)})", code="origin_not_allowed"
            )
        return None


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-expose-headers", EXPOSED_HEADERS.encode("latin-1")),
        (b"vary", b"Origin"),
    ]


async def _preflight_ok(origin: str, send: Send) -> None:
    headers = [
        *_cors_headers(origin),
        (b"access-control-allow-methods", ", ".join(CORS_METHODS).encode("latin-1")),
        (b"access-control-allow-headers", ", ".join(CORS_HEADERS).encode("latin-1")),
        (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode("latin-1")),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
