"""Bundle slots: verify before staging, atomic switch, rollback, and recovery after kill -9.

Bundles here are synthetic (a few random files, a real signature): slots never look inside
a graph, so these tests need no model and run on the device leg too.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from bundle_fixtures import make_bundle

from edge_runtime import signing
from edge_runtime.bundle.manifest import MANIFEST, verify_bundle
from edge_runtime.errors import BundleError, BundleIntegrityError, DeployError, DiskSpaceError
from edge_runtime.fleet.slots import DiskUsage, Slots


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub = tmp_path / "k.key", tmp_path / "k.pub"
    signing.generate_keypair(priv, pub)
    return priv, pub


@pytest.fixture
def device(tmp_path: Path, keys: tuple[Path, Path]) -> tuple[Slots, str, Path]:
    """A device root with bundle v1 active and confirmed, plus a v2 bundle to deploy."""
    priv, pub = keys
    slots = Slots(tmp_path / "dev", [signing.load_public_key(pub)], margin_bytes=0)
    v1 = slots.stage(make_bundle(tmp_path / "b1", priv, "1"))
    slots.activate(v1)
    slots.commit()
    return slots, v1, make_bundle(tmp_path / "b2", priv, "2")


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_stage_activate_rollback(device: tuple[Slots, str, Path]) -> None:
    slots, v1, b2 = device
    v2 = slots.stage(b2, sha(b2 / MANIFEST), signing.key_id(slots.trusted[0]))
    assert slots.active == v1  # staging never switches
    slots.activate(v2)
    assert (slots.active, slots.previous, slots.state()["confirmed"]) == (v2, v1, False)
    slots.commit()
    assert slots.recover() == v2
    assert slots.rollback() == v1
    assert (slots.active, slots.previous) == (v1, v2)
    assert slots.gc() == []
    assert verify_bundle(slots.active_path() or Path("-"), slots.trusted).manifest.version == "1"


def test_stage_from_tar_and_gc(device: tuple[Slots, str, Path], tmp_path: Path) -> None:
    slots, v1, b2 = device
    tar = tmp_path / "b2.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(b2, arcname="b2")
    v2 = slots.stage(tar, sha(tar))
    slots.activate(v2)
    slots.commit()
    b3 = make_bundle(tmp_path / "b3", tmp_path / "k.key", "3")
    slots.activate(slots.stage(b3))
    slots.commit()
    assert slots.gc() == [v1]  # v2 stays as `previous`
    assert sorted(p.name for p in slots.bundles.iterdir()) == sorted([v2, slots.active or ""])


def _tamper(b: Path) -> None:
    data = bytearray((b / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))


def test_every_refusal_leaves_active_untouched(
    device: tuple[Slots, str, Path], tmp_path: Path
) -> None:
    slots, v1, b2 = device
    before = sorted(p.name for p in slots.bundles.iterdir())
    with pytest.raises(BundleError, match="SHA-256"):
        slots.stage(b2, "0" * 64)
    with pytest.raises(DeployError, match="not a trusted key"):
        slots.stage(b2, expected_signer="00" * 8)
    with pytest.raises(DiskSpaceError, match="available"):
        Slots(slots.root, slots.trusted, disk_usage=lambda p: DiskUsage(10, 9, 1)).stage(b2)
    other_priv, other_pub = tmp_path / "o.key", tmp_path / "o.pub"
    signing.generate_keypair(other_priv, other_pub)
    with pytest.raises(BundleError, match="not trusted"):
        slots.stage(make_bundle(tmp_path / "bo", other_priv, "9"))
    _tamper(b2)
    with pytest.raises(BundleIntegrityError, match=r"model\.onnx"):
        slots.stage(b2)
    with pytest.raises(DeployError, match="not staged"):
        slots.activate("synthetic-9-000000000000")
    with pytest.raises(DeployError, match="not a bundle version id"):
        slots.activate("../../etc")
    assert (slots.active, slots.state()["confirmed"]) == (v1, True)
    assert sorted(p.name for p in slots.bundles.iterdir()) == before


def test_recover_falls_back_when_active_is_damaged(device: tuple[Slots, str, Path]) -> None:
    slots, v1, b2 = device
    v2 = slots.stage(b2)
    slots.activate(v2)
    slots.commit()
    _tamper(slots.path(v2))
    (slots.bundles / ".staging-leftover").mkdir()
    assert slots.recover() == v1
    assert not (slots.bundles / ".staging-leftover").exists()
    with pytest.raises(DeployError, match="no previous"):
        slots.rollback()


# Each step of `python -m edge_runtime.fleet.slots` (stage, activate, commit) and what a restart
# must then serve: before the health check is confirmed, the old bundle.
CRASH_STEPS = [
    ("stage:verified", "1"), ("stage:copying", "1"), ("stage:copied", "1"),
    ("stage:renamed", "1"), ("activate:tmp", "1"), ("activate:done", "1"), ("health", "1"),
    ("commit:tmp", "1"), ("commit:done", "2"),
]


@pytest.mark.parametrize(("step", "expect"), CRASH_STEPS)
def test_kill_9_at_each_step_recovers_a_whole_bundle(
    device: tuple[Slots, str, Path], keys: tuple[Path, Path], step: str, expect: str
) -> None:
    slots, _, b2 = device
    env = {**os.environ, "EDGE_FLEET_CRASH_AT": step}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.fleet.slots", str(slots.root), str(keys[1]), str(b2)],
        env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"PAUSED {step}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    restarted = Slots(slots.root, slots.trusted)
    active = restarted.recover()
    assert active is not None
    bundle = verify_bundle(restarted.path(active), restarted.trusted)  # whole, not a mixture
    assert bundle.manifest.version == expect
    assert not [p for p in restarted.bundles.iterdir() if p.name.startswith(".")]
    assert not list(restarted.root.glob(".state.json.*"))
