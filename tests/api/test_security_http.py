"""scripts/security/http.py, the HTTP rows of the attack matrix, run end to end against real
daemons (`edge-runtime serve` processes) serving the tiny bundle: every row must hold."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: scripts.*
from scripts.security.http import run


def test_every_http_attack_is_refused_and_the_daemon_keeps_serving(
    tiny_bundle: Any, tmp_path: Path
) -> None:
    # The module builds its own tiny bundle unless one is at WORKDIR/tiny: hand it the
    # session's (the bundle root may be a link; what it holds may not).
    (tmp_path / "tiny" / "work").mkdir(parents=True)
    (tmp_path / "tiny" / "bundle").symlink_to(tiny_bundle.path)
    (tmp_path / "tiny" / "work" / "signing.pub").symlink_to(tiny_bundle.pubkey)
    rows = run(tmp_path)
    attacks = " ".join(r.attack for r in rows)
    for needle in ("Host attacker.example", "text/plain", "lone surrogate", "/openapi.json",
                   "/readyz", "symlinked manifest.json", "symlinked directory", "alg none"):
        assert needle in attacks, needle
    failed = [r for r in rows if not r.held]
    assert not failed, "\n".join(f"{r.attack}: {r.observed}" for r in failed)
    assert all(r.area == "http" and r.observed for r in rows)
