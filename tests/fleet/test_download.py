"""Resumable bundle download against a real HTTP(S) server on loopback (tests/http_fixtures)."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from http_fixtures import RangeServer
from mqtt_fixtures import Pki

from edge_runtime.errors import DiskSpaceError, DownloadError
from edge_runtime.fleet.download import SPACE_CHECK_BYTES, DownloadPolicy, download, part_path

DATA = os.urandom(1_000_000)
SHA = hashlib.sha256(DATA).hexdigest()
FAST = DownloadPolicy(timeout_s=5, attempts=3, backoff_s=0.01)


def test_plain_download_is_checked_and_renamed(tmp_path: Path) -> None:
    with RangeServer({"/b.tar": DATA}) as srv:
        got = download(srv.url("/b.tar"), tmp_path, SHA, size=len(DATA), policy=FAST)
    assert got == tmp_path / f"{SHA}.tar" and got.read_bytes() == DATA
    assert not part_path(tmp_path, SHA).exists()
    assert srv.requests == [("/b.tar", None)]
    # Finished before a restart: returned at once, no request.
    with RangeServer({"/b.tar": DATA}) as srv:
        assert download(srv.url("/b.tar"), tmp_path, SHA, size=len(DATA), policy=FAST) == got
    assert srv.requests == []


def test_dropped_connections_resume_with_range(tmp_path: Path) -> None:
    seen: list[int] = []
    with RangeServer({"/b.tar": DATA}, drops=[300_000, 700_000]) as srv:
        got = download(srv.url("/b.tar"), tmp_path, SHA, size=len(DATA), policy=FAST,
                       progress=lambda n, total: seen.append(n))
    assert got.read_bytes() == DATA
    assert srv.requests == [("/b.tar", None), ("/b.tar", "bytes=300000-"),
                            ("/b.tar", "bytes=700000-")]
    assert seen == sorted(seen) and seen[-1] == len(DATA)


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path) -> None:
    with RangeServer({"/b.tar": DATA}, drops=[400_000], honor_range=False) as srv:
        got = download(srv.url("/b.tar"), tmp_path, SHA, size=len(DATA), policy=FAST)
    assert got.read_bytes() == DATA
    assert [r for _, r in srv.requests] == [None, "bytes=400000-"]


def test_https_with_the_device_ca(tmp_path: Path, pki: Pki) -> None:
    with RangeServer({"/b.tar": DATA}, drops=[500_000],
                     tls=(pki.server_cert, pki.server_key)) as srv:
        policy = DownloadPolicy(timeout_s=5, attempts=3, backoff_s=0.01, ca_file=str(pki.ca))
        got = download(srv.url("/b.tar"), tmp_path, SHA, size=len(DATA), policy=policy)
        assert got.read_bytes() == DATA
        with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
            download(srv.url("/b.tar"), tmp_path / "x", SHA, size=len(DATA),
                     policy=DownloadPolicy(timeout_s=5, attempts=1, backoff_s=0.01))


def test_refusals(tmp_path: Path) -> None:
    with RangeServer({"/b.tar": DATA}) as srv:
        url = srv.url("/b.tar")
        with pytest.raises(DownloadError, match=r"SHA-256 .* does not match"):
            download(url, tmp_path, "0" * 64, size=len(DATA), policy=FAST)
        assert list(tmp_path.iterdir()) == []  # the useless bytes are gone
        with pytest.raises(DownloadError, match="the server has 1000000 bytes, the command "
                                                "says 999"):
            download(url, tmp_path, SHA, size=999, policy=FAST)
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(srv.url("/nope.tar"), tmp_path, SHA, size=len(DATA), policy=FAST)
        n = len(srv.requests)
        # Disk full, size from the command: refused before any request.
        with pytest.raises(DiskSpaceError, match="1000000 of the 1000000-byte archive"):
            download(url, tmp_path, SHA, size=len(DATA), free_bytes=lambda p: 10, policy=FAST)
        assert len(srv.requests) == n
        # The archive fits, but not with what staging needs after it: refused up front too.
        with pytest.raises(DiskSpaceError, match="available"):
            download(url, tmp_path, SHA, size=len(DATA), free_bytes=lambda p: len(DATA) + 10,
                     reserve_bytes=lambda total: total, policy=FAST)
        assert not part_path(tmp_path, SHA).exists()
        with pytest.raises(DownloadError, match="http:// or https://"):
            download("ftp://127.0.0.1/b.tar", tmp_path, SHA, size=len(DATA), policy=FAST)
    with pytest.raises(DownloadError, match="gave up after 3 failed attempts"):
        download(url, tmp_path, SHA, size=len(DATA), policy=FAST)  # the server is gone


_CHILD = """
import sys
import threading
from pathlib import Path
from edge_runtime.fleet.download import download
from edge_runtime.fleet.slots import crash_point
download(sys.argv[1], Path(sys.argv[2]), sys.argv[3], size=int(sys.argv[4]),
         on_chunk=lambda n: crash_point("download:partial") if n > 200_000 else None)
"""


def test_kill_9_mid_download_then_resume(tmp_path: Path) -> None:
    with RangeServer({"/b.tar": DATA}, delay_s=0.01) as srv:
        env = {**os.environ, "EDGE_FLEET_CRASH_AT": "download:partial"}
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, srv.url("/b.tar"),
                                 str(tmp_path), SHA, str(len(DATA))], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "PAUSED download:partial"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        have = part_path(tmp_path, SHA).stat().st_size
        assert 200_000 < have < len(DATA)
        got = download(srv.url("/b.tar"), tmp_path, SHA, size=len(DATA), policy=FAST)
        assert got.read_bytes() == DATA
        assert srv.requests[-1] == ("/b.tar", f"bytes={have}-")


class _Chunked(http.server.BaseHTTPRequestHandler):
    """A server that sends `BODY` chunked, with no Content-Length (the attack of issue 11)."""
    protocol_version = "HTTP/1.1"
    body = b""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # the stdlib's name for the GET handler
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(0, len(self.body), 65536):
                part = self.body[i:i + 65536]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client hung up at its size: that is the point


def test_a_chunked_body_longer_than_the_signed_size_is_cut_at_it(tmp_path: Path) -> None:
    handler = type("H", (_Chunked,), {"body": DATA * 8})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    seen: list[int] = []
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/b.tar"
        with pytest.raises(DownloadError, match="does not match"):
            download(url, tmp_path, "0" * 64, size=len(DATA), policy=FAST,
                     on_chunk=seen.append)
        assert max(seen) == len(DATA)  # never a byte past the size the command signed
        got = download(url, tmp_path, SHA, size=len(DATA), policy=FAST)
        # DATA * 8 starts with DATA: its first `size` bytes are the archive signed for
        assert got.read_bytes() == DATA
        with pytest.raises(DownloadError, match="needs its size"):
            download(url, tmp_path / "n", SHA, size=None, policy=FAST)  # type: ignore[arg-type]
    finally:
        srv.shutdown()
        srv.server_close()


def test_free_space_is_checked_again_while_writing(tmp_path: Path) -> None:
    big = os.urandom(3 * SPACE_CHECK_BYTES)
    calls = [0]

    def shrinking(p: Path) -> int:  # another writer fills the disk once we have started
        calls[0] += 1
        return 1 << 40 if calls[0] == 1 else len(big) // 2

    with RangeServer({"/big.tar": big}) as srv, pytest.raises(DiskSpaceError,
                                                              match="available"):
        download(srv.url("/big.tar"), tmp_path, hashlib.sha256(big).hexdigest(),
                     size=len(big), free_bytes=shrinking, policy=FAST)
    have = part_path(tmp_path, hashlib.sha256(big).hexdigest()).stat().st_size
    assert SPACE_CHECK_BYTES <= have < 2 * SPACE_CHECK_BYTES + (256 << 10)
