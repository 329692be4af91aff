"""kill -9 of the agent process at every deploy stage (download, verify, stage, switch,
health check, commit), once each: scripts/deploy_crash_matrix.py's run with N=1. Each run
is a real agent process, a real persistent Mosquitto and a real HTTP server; the script's
docstring lists the checks (a whole old-or-new bundle after the crash, the command
completed exactly once after the restart, the download resumed with Range)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from deploy_crash_matrix import STAGES, run_matrix, table


def test_kill_9_at_every_deploy_stage_leaves_no_inconsistent_state() -> None:
    outcomes = run_matrix(runs=1, size=1 << 20, progress=lambda line: None)
    assert [o.point for o in outcomes] == [p for ps in STAGES.values() for p in ps]
    assert {o.stage for o in outcomes} >= {"download", "verify", "stage", "switch",
                                           "health check"}
    assert all(o.runs == 1 for o in outcomes)
    assert sum(o.inconsistent for o in outcomes) == 0, (table(outcomes),
                                                        [o.failures for o in outcomes])
    download = next(o for o in outcomes if o.point == "download:partial")
    assert download.resumed == 1
