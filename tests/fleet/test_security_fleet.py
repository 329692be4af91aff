"""scripts/security/fleet.py's attack rows, run here end to end (a real Mosquitto, a real
agent process, a real HTTP server): every row must hold."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from security import fleet


def test_every_fleet_attack_is_refused_and_the_device_keeps_its_bundle(tmp_path: Path) -> None:
    rows = fleet.run(tmp_path)
    assert len(rows) >= 20
    failed = [(r.attack, r.observed) for r in rows if not r.held]
    assert failed == []
    assert all(r.area == "fleet" and r.observed for r in rows)
