"""An append-only audit trail: one JSON object per line, fsynced, rotated by size.

    log = AuditLog(root / "audit.jsonl")
    log.append({"event": "command", "id": "c-46", "outcome": "refused", ...})
    for rec in read_audit(root / "audit.jsonl", device="dev-1", since=t): ...

The device agent records every command it receives, accepted or refused (who signed it,
when, the outcome and the reason; of a refused payload only its SHA-256, never its bytes),
and the operator's tools record every rollout and command they send. Each line is written
with one `write` on an O_APPEND descriptor and fsynced before `append` returns, so a kill -9
loses at most the line being written; a torn last line is skipped when reading. When the
file passes `max_bytes` it becomes `audit.jsonl.1` (the older ones shift up to `.{keep}`,
the oldest is dropped): the trail on disk stays bounded on a device's small flash.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from edge_runtime.atomic import fsync_dir

AUDIT = "audit.jsonl"
MAX_BYTES = 4 << 20
KEEP = 4


class AuditLog:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        rec = {"ts": round(time.time(), 3), **record}
        line = (json.dumps(rec, sort_keys=True, default=str) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if new:
                fsync_dir(self.path.parent)
            if size >= self.max_bytes:
                self._rotate()
        return rec

    def _rotate(self) -> None:
        for i in range(self.keep, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if i == self.keep:
                older.unlink(missing_ok=True)
            elif older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.keep > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        fsync_dir(self.path.parent)


def audit_files(path: Path) -> list[Path]:
    """The log and its rotated parts, oldest first."""
    rotated = sorted((p for p in path.parent.glob(f"{path.name}.*")
                      if p.suffix[1:].isdigit()), key=lambda p: -int(p.suffix[1:]))
    return rotated + ([path] if path.exists() else [])


def read_audit(path: Path, device: str | None = None, since: float | None = None
               ) -> Iterator[dict[str, Any]]:
    """Records in the order written, filtered by device and time; torn lines skipped."""
    for f in audit_files(Path(path)):
        with open(f, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue  # the line a kill -9 cut short
                if not isinstance(rec, dict):
                    continue
                if device is not None and rec.get("device") != device:
                    continue
                if since is not None and float(rec.get("ts", 0)) < since:
                    continue
                yield rec
