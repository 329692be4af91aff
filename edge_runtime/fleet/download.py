"""Resumable HTTP(S) download of a bundle archive, checked before anything uses it.

    path = download(url, downloads_dir, sha256, size=N, free_bytes=..., reserve_bytes=...)

The archive grows in `downloads_dir/<sha256>.part`. A dropped connection is retried with
`Range: bytes=<have>-` from where it stopped, and so is a restart after `kill -9`: the part
file stays where it is (its bytes are in the page cache the moment `write` returns, so
killing the process loses none of them). A server that ignores Range (200 instead of 206)
or whose Content-Range does not start where we asked gets the download restarted from zero.
Once the whole file is there its SHA-256 must be the command's; only then is it renamed to
`<sha256>.tar` (fsync, rename, fsync dir), so a `.tar` in the directory is always whole and
checked, and a later call returns it at once.

The expected size is the signed command's `size`, required: a server's Content-Length (or a
chunked body without one) is not a bound a device may trust. The free space is checked
before the first byte is written, and the download is refused when the rest of the archive
plus `reserve_bytes` (what staging will need after it: the extracted bundle) would not fit;
it is checked again every SPACE_CHECK_BYTES while writing (another writer may be filling
the disk), and a server that sends more than the size is cut off at the size.

Standard library only (urllib): the device's base install must not grow for this.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.atomic import fsync_dir
from edge_runtime.errors import DiskSpaceError, DownloadError

log = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https")
PART_SUFFIX = ".part"
DONE_SUFFIX = ".tar"
_CHUNK = 256 << 10
SPACE_CHECK_BYTES = 4 << 20


@dataclass(frozen=True)
class DownloadPolicy:
    timeout_s: float = 30.0
    """Socket timeout of one connect or read: a stalled server counts as a dropped one."""
    attempts: int = 8
    """Connections tried in a row without any progress before giving up."""
    backoff_s: float = 0.5
    """First wait between attempts; doubles up to `backoff_max_s`."""
    backoff_max_s: float = 30.0
    ca_file: str | None = None
    """CA bundle for https URLs (None: the system's CAs)."""


Progress = Callable[[int, "int | None"], None]
"""Told (bytes on disk, expected total or None) after every chunk."""
FreeBytes = Callable[[Path], int]


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in URL_SCHEMES


def check_url(source: str) -> str:
    """`source` if it is an http(s) URL with a host, else DownloadError naming it."""
    u = urllib.parse.urlsplit(source)
    if u.scheme not in URL_SCHEMES or not u.hostname:
        raise DownloadError(f"bundle URL {source!r} must be http:// or https:// with a host")
    return source


def part_path(downloads: Path, sha256: str) -> Path:
    return downloads / f"{sha256}{PART_SUFFIX}"


def done_path(downloads: Path, sha256: str) -> Path:
    return downloads / f"{sha256}{DONE_SUFFIX}"


def download(
    url: str,
    downloads: Path,
    sha256: str,
    *,
    size: int,
    free_bytes: FreeBytes | None = None,
    reserve_bytes: Callable[[int], int] = lambda total: 0,
    policy: DownloadPolicy = DownloadPolicy(),
    progress: Progress | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Fetch `url` into `downloads/<sha256>.tar` (resuming a `.part`); return its path.

    `reserve_bytes(total)` is the space needed beyond the archive itself; `on_chunk(bytes)`
    runs after each chunk is written (the kill -9 tests pause there).
    """
    check_url(url)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DownloadError(f"{url}: a download needs its size in bytes (the signed deploy's "
                            f"params.size), got {size!r}")
    sha256 = sha256.lower()
    downloads.mkdir(parents=True, exist_ok=True)
    done = done_path(downloads, sha256)
    if done.exists():  # finished and checked before a restart
        return done
    part = part_path(downloads, sha256)
    free = free_bytes or _statvfs_free
    ctx = ssl.create_default_context(cafile=policy.ca_file) if url.startswith("https") else None
    total: int | None = size
    _check_space(downloads, size, part, free, reserve_bytes(size))
    failures, delay = 0, policy.backoff_s
    while True:
        have = part.stat().st_size if part.exists() else 0
        if total is not None and have > total:
            log.warning("%s is longer than the expected %d bytes; starting over", part, total)
            part.unlink()
            have = 0
        if total is not None and have == total:
            break
        try:
            total, progressed = _fetch(url, part, have, total, ctx, policy, free,
                                       reserve_bytes, progress, on_chunk)
        except _Retryable as e:
            progressed = e.progressed
            failures = 0 if progressed else failures + 1
            if progressed:
                delay = policy.backoff_s
            if failures >= policy.attempts:
                raise DownloadError(f"{url}: gave up after {failures} failed attempts in a row "
                                    f"({part.stat().st_size if part.exists() else 0} bytes "
                                    f"kept for a later resume): {e}") from None
            log.warning("download of %s interrupted (%s); resuming in %.1f s", url, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, policy.backoff_max_s)
            continue
        if total is None:  # no length known: the server closing the body marks the end
            break
    return _finish(url, part, done, sha256, total)


class _Retryable(Exception):
    def __init__(self, message: str, progressed: bool) -> None:
        super().__init__(message)
        self.progressed = progressed


def _fetch(
    url: str, part: Path, have: int, total: int | None, ctx: ssl.SSLContext | None,
    policy: DownloadPolicy, free: FreeBytes, reserve_bytes: Callable[[int], int],
    progress: Progress | None, on_chunk: Callable[[int], None] | None,
) -> tuple[int | None, bool]:
    """One connection: append what the server sends to `part`; return (total, progressed)."""
    req = urllib.request.Request(url, headers={"Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    written = 0
    checked = 0
    try:
        resp = urllib.request.urlopen(req, timeout=policy.timeout_s, context=ctx)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left after `have`: maybe complete already
            length = _content_range_total(e.headers.get("Content-Range"))
            if length == have:
                return have, False
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 at offset {have}; restarting", False) from None
        if e.code >= 500 or e.code in (408, 429):
            raise _Retryable(f"HTTP {e.code} {e.reason}", False) from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retryable(f"{type(e).__name__}: {e}", False) from None
    with resp:
        status = resp.status
        if have and status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retryable(f"Content-Range starts at {start}, not {have}", False)
            length = _content_range_total(resp.headers.get("Content-Range"))
        elif status == 200:
            if have:
                log.info("%s ignores Range; downloading it again from the start", url)
                part.unlink(missing_ok=True)
                have = 0
            cl = resp.headers.get("Content-Length")
            length = int(cl) if cl and cl.isdigit() else None
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status}")
        if length is not None:
            if total is not None and length != total:
                raise DownloadError(f"{url}: the server has {length} bytes, the command says "
                                    f"{total}")
            if total is None:
                _check_space(part.parent, length, part, free, reserve_bytes(length))
            total = length
        try:
            with open(part, "ab") as f:
                while True:
                    chunk = resp.read(_CHUNK if total is None else
                                      min(_CHUNK, total - have - written))
                    if not chunk:
                        break
                    f.write(chunk)
                    f.flush()  # in the page cache: a kill -9 now loses nothing
                    written += len(chunk)
                    if total is not None and written - checked >= SPACE_CHECK_BYTES:
                        checked = written
                        _check_space(part.parent, total, part, free, reserve_bytes(total))
                    if on_chunk is not None:
                        on_chunk(have + written)
                    if progress is not None:
                        progress(have + written, total)
                    if total is not None and have + written >= total:
                        break
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {e}", written > 0) from None
    if total is not None and have + written < total:
        raise _Retryable(f"connection closed at byte {have + written} of {total}", written > 0)
    return total, written > 0


def _finish(url: str, part: Path, done: Path, sha256: str, total: int | None) -> Path:
    got = part.stat().st_size if part.exists() else 0
    if total is not None and got != total:
        raise DownloadError(f"{url}: downloaded {got} bytes, expected {total}")
    h = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if digest != sha256:
        # Whatever went wrong (a changed file on the server, a torn part after a power cut),
        # these bytes are useless: the next attempt starts clean.
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: SHA-256 {digest[:16]}… of the {got} bytes downloaded "
                            f"does not match the expected {sha256[:16]}…")
    os.replace(part, done)
    fsync_dir(done.parent)
    return done


def _check_space(directory: Path, total: int, part: Path, free: FreeBytes,
                 reserve: int) -> None:
    have = part.stat().st_size if part.exists() else 0
    need = max(0, total - have) + reserve
    avail = free(directory)
    if avail < need:
        raise DiskSpaceError(
            f"downloading needs {need} bytes free ({total - have} of the {total}-byte archive "
            f"still to fetch + {reserve} to stage it), {avail} available in {directory}"
        )


def _statvfs_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-999/1000"
    if value is None:
        return None
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(value: str | None) -> int | None:
    # "bytes 100-999/1000" or "bytes */1000"; "/*" means unknown
    if value is None:
        return None
    try:
        tail = value.rsplit("/", 1)[1]
        return int(tail) if tail != "*" else None
    except (IndexError, ValueError):
        return None
