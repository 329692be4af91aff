"""What `edge-runtime serve` checks before it spends minutes loading a model.

The listening socket is bound first: a port in use is a one-line error with the fix before
the model loads (not an asyncio traceback after it), and the bound socket is handed to
uvicorn, so nothing else can take the port in between.
"""

from __future__ import annotations

import errno
import logging
import socket

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
