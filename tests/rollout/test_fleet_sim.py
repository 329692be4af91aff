"""scripts/fleet_sim.py end to end on a few devices: its own Mosquitto, worker processes of
real agents, a staged rollout with devices going offline, and an abort that rolls back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mqtt_fixtures import MOSQUITTO

ROOT = Path(__file__).resolve().parents[2]


def test_fleet_sim_smoke(tmp_path: Path) -> None:
    assert MOSQUITTO is not None, "mosquitto is not installed"
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fleet_sim.py"), "--devices", "10",
         "--procs", "2", "--soak", "0.5", "--ack-timeout", "3", "--telemetry-interval", "0.3",
         "--offline-share", "0.3", "--probe-fail-share", "0.15", "--max-failures", "60%",
         "--workdir", str(tmp_path), "--no-write"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "rollout sim-staged completed" in text
    assert "rollout sim-abort aborted: canary after" in text
    assert "canary devices back on their previous bundle (retained status): 1/1" in text
    assert "devices outside the canary that got a command: 0" in text
    assert "| staged v1→v2 | canary | 1 |" in text
    assert " timeout" in text  # an offline device of a later batch timed out
