"""The device agent's command journal: what makes command handling exactly-once.

    root/commands.json   {"commands": [{"id", "type", "params", "final": ack|null,
                                        "acked": bool}, ...]}   (atomic JSON, arrival order)

An entry is written (fsync + rename) before the agent returns from the MQTT handler, i.e.
before paho PUBACKs the command: once the broker forgets a command, the journal has it.
`final` is the command's last ack, written before that ack is published; `acked` turns
true when the broker has PUBACKed that ack. So after a kill -9:

    final is null             the command was running: run it again (each step is idempotent)
    final set, acked false    the result may never have left: publish it again (duplicate)
    final set, acked true     done; a re-delivered id is answered from here, never re-run

The oldest finished entries are dropped beyond `keep`. The document also remembers the
nonce of every signed command (`"nonces": {nonce: [expires, id]}`) until that command
expires, in the same atomic write as its entry: a replayed command is refused by its nonce
even after its id was dropped, and an expired one by its expiry (command_auth.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_runtime.atomic import atomic_write_json
from edge_runtime.errors import CommandAuthError, FleetError

JOURNAL = "commands.json"


class CommandJournal:
    def __init__(self, path: Path, keep: int = 1000) -> None:
        self.path = path
        self.keep = keep
        self._lock = threading.Lock()
        self._entries, self._nonces = _read(path)

    def get(self, cid: str) -> dict[str, Any] | None:
        with self._lock:
            e = self._entries.get(cid)
            return dict(e) if e is not None else None

    def add(self, cid: str, ctype: str, params: Mapping[str, Any], nonce: str | None = None,
            expires: int | None = None) -> dict[str, Any] | None:
        """Record a new command durably; return the existing entry instead if the id is known.

        A known id is a re-delivery (answered from its entry, never re-run); an unknown id
        whose nonce was used before is a replay: CommandAuthError."""
        with self._lock:
            if cid in self._entries:
                return dict(self._entries[cid])
            if nonce is not None:
                seen = self._nonces.get(nonce)
                if seen is not None:
                    raise CommandAuthError(f"replayed command refused: its nonce was used by "
                                           f"command {seen[1]!r}, already handled")
                self._nonces[nonce] = [int(expires or 0), cid]
            self._entries[cid] = {"id": cid, "type": ctype, "params": dict(params),
                                  "final": None, "acked": False}
            self._save()
            return None

    def finish(self, cid: str, ctype: str, final: Mapping[str, Any]) -> None:
        with self._lock:
            e = self._entries.setdefault(cid, {"id": cid, "type": ctype, "params": {}})
            e["final"], e["acked"] = dict(final), False
            self._save()

    def mark_acked(self, cid: str) -> None:
        with self._lock:
            e = self._entries.get(cid)
            if e is not None and e.get("final") is not None and not e.get("acked"):
                e["acked"] = True
                self._save()

    def pending(self) -> list[dict[str, Any]]:
        """Commands that were running when the process stopped, in arrival order."""
        with self._lock:
            return [dict(e) for e in self._entries.values() if e.get("final") is None]

    def unacked(self) -> list[dict[str, Any]]:
        """Finished commands whose final ack the broker has not confirmed."""
        with self._lock:
            return [dict(e) for e in self._entries.values()
                    if e.get("final") is not None and not e.get("acked")]

    def _save(self) -> None:
        if len(self._entries) > self.keep:  # oldest finished entries go first
            done = [k for k, v in self._entries.items() if v.get("final") is not None]
            for k in done[: len(self._entries) - self.keep]:
                del self._entries[k]
        now = time.time()
        for n in [n for n, (exp, _) in self._nonces.items() if exp < now]:
            del self._nonces[n]  # expired: the command itself would be refused now
        atomic_write_json(self.path, {"commands": list(self._entries.values()),
                                      "nonces": self._nonces})


def _read(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, list[Any]]]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, {}
    except (OSError, ValueError) as e:
        # Only a hand edit or a failing disk gets here (our writes are atomic): refuse to
        # start rather than forget commands and run them twice.
        raise FleetError(f"command journal {path} is unreadable: {e}") from e
    # Insertion order is the order commands arrived, which the pruning above relies on.
    # Entries written before `acked` existed were acked when written: treat them so.
    return ({e["id"]: {"acked": True, **e} for e in doc.get("commands", [])},
            dict(doc.get("nonces", {})))
