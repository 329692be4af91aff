"""edge-fleet signs every command: these tests' operator key (the one the simulated devices
trust) and an audit log of their own, through the environment as an operator sets them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_fixtures import SimBundles, sim_bundles  # noqa: F401


@pytest.fixture(autouse=True)
def operator_env(sim_bundles: SimBundles, tmp_path: Path,  # noqa: F811
                 monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGE_FLEET_KEY", str(sim_bundles.operator_key))
    audit = tmp_path / "operator-audit.jsonl"
    monkeypatch.setenv("EDGE_FLEET_AUDIT", str(audit))
    return audit
