"""Rollout state in SQLite, so a controller killed mid-rollout continues where it stopped.

    store = RolloutStore(path)                      WAL, synchronous=FULL
    store.create(record, devices)                   one transaction
    store.save(changes)                             one transaction per batch of transitions
    record, devices = store.load(rollout_id)        RolloutError when unknown
    with store.lock(rollout_id): ...                one controller per rollout (flock)

Tables: `rollouts` (one row per rollout: state, phase, step, reason, the spec as JSON),
`devices` (one row per rollout and device) and `events` (the timeline that `status` shows
and the fleet simulator reads phase times from). Every transition the controller makes is
written before the command it implies is published (`Controller.take_changes`), so after a
SIGKILL the database never claims less than was sent; what it claims more (a deploy marked
sent that never left) is re-sent on resume, and the agents deduplicate by command id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_runtime.errors import RolloutError
from edge_runtime.rollout.controller import Changes
from edge_runtime.rollout.plan import DeviceRecord, Event, RolloutRecord, RolloutSpec

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, phase INTEGER NOT NULL, phases INTEGER NOT NULL,
    step TEXT NOT NULL, step_started REAL NOT NULL, phase_started REAL NOT NULL,
    reason TEXT, created REAL NOT NULL, updated REAL NOT NULL, spec TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    rollout TEXT NOT NULL REFERENCES rollouts(id), device TEXT NOT NULL,
    phase INTEGER NOT NULL, seq INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT,
    step TEXT, before TEXT, after TEXT, sent_at REAL, active_ts REAL, baseline_quality REAL,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE IF NOT EXISTS events (
    rollout TEXT NOT NULL REFERENCES rollouts(id), n INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, phase INTEGER NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_rollout ON events (rollout, n);
"""
_DEVICE_COLS = ("device", "phase", "seq", "state", "reason", "step", "before", "after",
                "sent_at", "active_ts", "baseline_quality")


def default_db() -> Path:
    """$EDGE_FLEET_DB, else $XDG_STATE_HOME/edge-fleet/rollouts.db (~/.local/state/...)."""
    if os.environ.get("EDGE_FLEET_DB"):
        return Path(os.environ["EDGE_FLEET_DB"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edge-fleet" / "rollouts.db"


class RolloutStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns, before the command it implies is sent.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def lock(self, rollout_id: str) -> Iterator[None]:
        """Exclusive per rollout across processes; the kernel drops it when the holder dies
        (SIGKILL included), so a resume never waits for a dead controller."""
        path = self.path.with_name(f"{self.path.name}.{rollout_id}.lock")
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise RolloutError(f"rollout {rollout_id} is being driven by another edge-fleet "
                                   f"process (pid {f.read().strip() or '?'})") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- writes ---------------------------------------------------------------------------

    def create(self, record: RolloutRecord, devices: list[DeviceRecord]) -> None:
        now = time.time()
        record.created = record.updated = now
        with self._tx() as db:
            if db.execute("SELECT 1 FROM rollouts WHERE id=?", (record.id,)).fetchone():
                raise RolloutError(f"rollout {record.id} already exists in {self.path}")
            self._put_rollout(db, record)
            self._put_devices(db, record.id, devices)

    def save(self, rollout_id: str, changes: Changes) -> None:
        if changes.rollout is None and not changes.devices and not changes.events:
            return
        with self._tx() as db:
            if changes.rollout is not None:
                changes.rollout.updated = time.time()
                self._put_rollout(db, changes.rollout)
            self._put_devices(db, rollout_id, changes.devices)
            db.executemany(
                "INSERT INTO events (rollout, ts, phase, kind, detail) VALUES (?,?,?,?,?)",
                [(rollout_id, e.ts, e.phase, e.kind, e.detail) for e in changes.events])

    def _put_rollout(self, db: sqlite3.Connection, r: RolloutRecord) -> None:
        db.execute(
            "INSERT OR REPLACE INTO rollouts (id, state, phase, phases, step, step_started, "
            "phase_started, reason, created, updated, spec) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (r.id, r.state, r.phase, r.phases, r.step, r.step_started, r.phase_started,
             r.reason, r.created, r.updated, json.dumps(dataclasses.asdict(r.spec))))

    def _put_devices(self, db: sqlite3.Connection, rollout_id: str,
                     devices: list[DeviceRecord]) -> None:
        cols = ", ".join(_DEVICE_COLS)
        marks = ", ".join("?" for _ in range(len(_DEVICE_COLS) + 1))
        db.executemany(
            f"INSERT OR REPLACE INTO devices (rollout, {cols}) VALUES ({marks})",
            [(rollout_id, *(getattr(d, c) for c in _DEVICE_COLS)) for d in devices])

    # -- reads ----------------------------------------------------------------------------

    def load(self, rollout_id: str) -> tuple[RolloutRecord, list[DeviceRecord]]:
        row = self.db.execute(
            "SELECT id, state, phase, phases, step, step_started, phase_started, reason, "
            "created, updated, spec FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        if row is None:
            known = [r[0] for r in self.db.execute(
                "SELECT id FROM rollouts ORDER BY created DESC LIMIT 5")]
            raise RolloutError(f"unknown rollout {rollout_id!r} in {self.path} (latest: "
                               f"{', '.join(known) or 'none'})")
        spec = RolloutSpec(**json.loads(row[10]))
        record = RolloutRecord(id=row[0], spec=spec, phases=row[3], state=row[1], phase=row[2],
                               step=row[4], step_started=row[5], phase_started=row[6],
                               reason=row[7], created=row[8], updated=row[9])
        devices = [DeviceRecord(*r) for r in self.db.execute(
            f"SELECT {', '.join(_DEVICE_COLS)} FROM devices WHERE rollout=? ORDER BY phase, seq, "
            "device", (rollout_id,))]
        return record, devices

    def events(self, rollout_id: str) -> list[Event]:
        return [Event(*r) for r in self.db.execute(
            "SELECT ts, phase, kind, detail FROM events WHERE rollout=? ORDER BY n",
            (rollout_id,))]

    def list(self) -> list[dict[str, Any]]:
        out = []
        for r in self.db.execute(
                "SELECT r.id, r.state, r.phase, r.phases, r.reason, r.created, r.updated, r.spec, "
                "(SELECT COUNT(*) FROM devices d WHERE d.rollout=r.id AND d.phase>=0) "
                "FROM rollouts r ORDER BY r.created"):
            spec = json.loads(r[7])
            out.append({"id": r[0], "state": r[1], "phase": r[2], "phases": r[3],
                        "reason": r[4], "created": r[5], "updated": r[6],
                        "group": spec["group"], "version": spec["version"], "devices": r[8]})
        return out
