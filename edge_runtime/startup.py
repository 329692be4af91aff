"""What `edge-runtime serve` checks before it spends minutes loading a model.

The listening socket is bound first: a port in use is a one-line error with the fix before
the model loads (not an asyncio traceback after it), and the bound socket is handed to
uvicorn, so nothing else can take the port in between.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from edge_runtime.engines.providers import provider_report
from edge_runtime.errors import ConfigError

log = logging.getLogger("edge_runtime")


def listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A socket bound to host:port and listening; ConfigError (one line, with the fix) if
    the address cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve --host {host!r} ({e.strerror}): pass an address "
                          "such as 127.0.0.1 or 0.0.0.0") from e
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn does: a restart may rebind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            fix = "stop the process using it or pass --port N (0 = any free port)"
        elif e.errno == errno.EACCES:
            fix = "ports below 1024 need privileges: pass --port 8000"
        else:
            fix = "pass another --host/--port"
        raise ConfigError(f"cannot listen on {shown}: {e.strerror}: {fix}") from e
    sock.setblocking(False)
    return sock


def log_providers() -> None:
    """The start-up line that says which execution providers ONNX Runtime offers here and
    why a GPU one is missing (engines/providers.py)."""
    log.info("%s", provider_report().line())


def demo_bundle() -> tuple[Path, Path]:
    """serve without --bundle: the demo bundle and its public key, built on first use."""
    try:
        from edge_build.demo import cached_default_bundle, default_bundle
        from edge_build.extras import INSTALL_HINT, missing_build_modules
    except ImportError as e:
        raise ConfigError(
            f"no --bundle given and the demo bundle cannot be built here ({e}): "
            "pip install 'edge-runtime[build]', or pass --bundle DIR --pubkey PEM"
        ) from e
    cached = cached_default_bundle()
    if cached is not None:
        log.info("no --bundle given: serving the cached demo bundle %s", cached[0])
        return cached
    missing = missing_build_modules()
    if missing:  # before minutes of work, not a traceback in the middle of it
        raise ConfigError(
            f"no --bundle given and the demo bundle is not built yet; building it needs "
            f"{', '.join(missing)}: {INSTALL_HINT}, or pass --bundle DIR --pubkey PEM"
        )
    log.info("no --bundle given: building the demo bundle (once, up to 15 minutes)")
    return default_bundle()
