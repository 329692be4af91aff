"""The structured access and audit log: one JSON object per line.

Each HTTP request writes one record when its response has been sent (for a stream: when the
stream ended or the client went away), with what an operator asks after an incident: which
request, from where, for which model, how many tokens in and out, where it was served, the
status and the latency. Later issues write fleet commands and their results to the same log
with `event: "command"`, so one file answers "what happened on this device".

JSON lines rather than a text format because the consumers are `jq`, journald and log
shippers, and a record with a stable set of keys needs no parser.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO


class AccessLog:
    """Appends records to a text stream; safe to call from any thread."""

    def __init__(self, stream: TextIO, close: bool = False) -> None:
        self._stream = stream
        self._close = close
        self._lock = threading.Lock()

    @classmethod
    def open(cls, target: str) -> AccessLog | None:
        """`-` for stdout, a file path to append to, or empty for no log (None)."""
        if not target:
            return None
        if target == "-":
            return cls(sys.stdout)
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Line buffering: a record is on disk (in the page cache) as soon as it is written,
        # so a crash loses at most the request in flight.
        return cls(open(path, "a", encoding="utf-8", buffering=1), close=True)

    def write(self, record: Mapping[str, Any], event: str = "http") -> None:
        line = json.dumps(
            {"ts": _now(), "event": event, **record}, separators=(",", ":"), default=str
        )
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._close:
            with self._lock:
                self._stream.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
