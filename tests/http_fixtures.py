"""A real HTTP(S) file server on loopback, in a thread, with Range and injectable faults.

    with RangeServer({"/b.tar": data}, drops=[100_000]) as srv:
        srv.url("/b.tar")      # the first response is cut after 100,000 body bytes
        srv.requests           # [(path, Range header or None), ...]

Built on the standard library's ThreadingHTTPServer: `Range: bytes=N-` answers 206 with a
Content-Range, unless `honor_range=False` (then 200 with the whole file, as servers that
ignore Range do). `drops` are body offsets (of the whole file) at which successive responses
close the socket mid-body; `delay_s` slows each chunk so a test can kill a client mid-file.
"""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from pathlib import Path
from types import TracebackType


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the connections this server cuts on purpose end in errors; they are the point


class RangeServer:
    def __init__(self, files: dict[str, bytes], drops: list[int] | None = None,
                 honor_range: bool = True, delay_s: float = 0.0,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.files = dict(files)
        self.drops = list(drops or [])
        self.honor_range = honor_range
        self.delay_s = delay_s
        self.requests: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # the stdlib's name for the GET handler
                outer._serve(self)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        with self._lock:
            self.requests.append((h.path, rng))
            drop = self.drops.pop(0) if self.drops else None
        data = self.files.get(h.path)
        if data is None:
            h.send_error(404)
            return
        start = 0
        if rng is not None and self.honor_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Accept-Ranges", "bytes" if self.honor_range else "none")
        h.end_headers()
        end = len(data) if drop is None or drop <= start else drop
        pos = start
        while pos < end:
            n = min(64 << 10, end - pos)
            h.wfile.write(data[pos:pos + n])
            h.wfile.flush()
            pos += n
            if self.delay_s:
                time.sleep(self.delay_s)
        if end < len(data):  # the fault: the connection dies mid-body
            h.close_connection = True
            h.connection.close()
