"""Staged rollouts end to end: `edge-fleet` against a real Mosquitto and real device agents."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_fixtures import Observer, SimBundles, SimFleet, sim_bundles  # noqa: F401
from mqtt_fixtures import Broker

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.errors import HealthCheckError
from edge_runtime.fleet.slots import version_id
from edge_runtime.rollout import cli as fleet_cli
from edge_runtime.rollout.store import RolloutStore

RULE = "error_rate>0.02 or ttft_p95_ms>800 or quality_drop>0.05"


@pytest.fixture
def fleet(broker: Broker, tmp_path: Path, sim_bundles: SimBundles) -> Iterator[SimFleet]:  # noqa: F811
    f = SimFleet(broker.url, tmp_path / "devices", sim_bundles)
    yield f
    f.close()


@pytest.fixture
def observer(broker: Broker) -> Iterator[Observer]:
    o = Observer(broker.url)
    yield o
    o.mqtt.stop()


def _deploy(broker: Broker, db: Path, bundle: Path, pub: Path, rid: str, *extra: str
            ) -> list[str]:
    return ["--broker", broker.url, "--db", str(db), "deploy", str(bundle), "--group", "lab",
            "--abort-if", RULE, "--pubkey", str(pub), "--id", rid, "--discover-wait", "1",
            *extra]


def _status(db: Path, rid: str, capsys: Any) -> dict[str, Any]:
    capsys.readouterr()
    assert fleet_cli.main(["--db", str(db), "status", rid, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def _phases(s: dict[str, Any]) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in range(s["phases"])]
    for d in s["devices"]:
        if d["phase"] >= 0:
            out[d["phase"]].append(d["device"])
    return out


def test_staged_rollout_goes_canary_then_batches(
    broker: Broker, fleet: SimFleet, observer: Observer, sim_bundles: SimBundles,  # noqa: F811
    tmp_path: Path, capsys: Any,
) -> None:
    for i in range(10):
        fleet.start(f"cell-{i}")
    db = tmp_path / "r.db"
    argv = _deploy(broker, db, sim_bundles.v2, sim_bundles.pub, "ok1", "--canary", "20%",
                   "--batch", "40%", "--soak", "0.5", "--ack-timeout", "20")
    assert fleet_cli.main(argv) == 0
    s = _status(db, "ok1", capsys)
    assert s["state"] == "completed" and s["counts"] == {"active": 10}
    phases = _phases(s)
    assert [len(p) for p in phases] == [2, 4, 4]
    # On the wire: no device of a phase got its deploy before the previous phase was all
    # active (and had passed its soak gate).
    log = observer.rows()
    for prev, cur in itertools.pairwise(phases):
        last_active = max(i for i, r in enumerate(log)
                          if r[0] == "ack" and r[1] in prev and r[3] == "active")
        first_cmd = min(i for i, r in enumerate(log) if r[0] == "cmd" and r[1] in cur)
        assert last_active < first_cmd
    assert [e["kind"] for e in s["events"]].count("gate") == 3
    for dev, agent in fleet.agents.items():
        assert (agent.slots.active or "").startswith("sim-2-"), dev
        assert len(observer.rows(what="ack", device=dev, state="received")) == 1


def test_abort_rolls_back_the_canary(
    broker: Broker, fleet: SimFleet, observer: Observer, sim_bundles: SimBundles,  # noqa: F811
    tmp_path: Path, capsys: Any,
) -> None:
    for i in range(8):
        fleet.start(f"cell-{i}")
    before = {d: a.slots.active for d, a in fleet.agents.items()}
    db = tmp_path / "r.db"
    argv = _deploy(broker, db, sim_bundles.bad, sim_bundles.pub, "bad1", "--canary", "25%",
                   "--soak", "0.5", "--ack-timeout", "20")
    capsys.readouterr()
    assert fleet_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rollout bad1 aborted: canary after ") and "\n" not in err
    assert re.search(r"mean of 2 devices: error_rate=0\.0[78]\d*>0\.02 "
                     r"\(worst: cell-\d error_rate=0\.0[789]\d*\)$", err), err
    s = _status(db, "bad1", capsys)
    assert s["state"] == "aborted" and s["reason"] in err
    canary, *_rest = _phases(s)
    assert s["counts"] == {"rolled_back": 2, "pending": 6}
    for dev, agent in fleet.agents.items():
        assert agent.slots.active == before[dev], dev  # canary back on v1, others untouched
    assert {r[1] for r in observer.rows(what="cmd")} == set(canary)
    assert {r[3] for r in observer.rows(what="cmd")} == {"deploy", "rollback"}
    # The operator's rollback of an aborted rollout has nothing left to do.
    assert fleet_cli.main(["--db", str(db), "rollback", "bad1"]) == 0
    assert _status(db, "bad1", capsys)["state"] == "rolled_back"


def test_offline_and_failing_devices_count_against_max_failures(
    broker: Broker, fleet: SimFleet, sim_bundles: SimBundles, tmp_path: Path,  # noqa: F811
    capsys: Any,
) -> None:
    def sick(path: Path) -> None:
        raise HealthCheckError("quality probe: score 0.41 < 0.80")

    for i in range(6):
        fleet.start(f"cell-{i}", health_check=sick if i == 0 else None)
    db = tmp_path / "r.db"
    store = RolloutStore(db)
    argv = _deploy(broker, db, sim_bundles.v2, sim_bundles.pub, "f1", "--canary", "1",
                   "--batch", "50%", "--soak", "0.3", "--ack-timeout", "3",
                   "--max-failures", "40%")
    import threading

    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(fleet_cli.main(argv)))
    t.start()
    # Take the last device of the last batch offline once the canary has passed.
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        try:
            record, devices = store.load("f1")
        except Exception:
            time.sleep(0.05)
            continue
        if record.phase >= 1:
            victim = max((d for d in devices if d.phase == record.phases - 1),
                         key=lambda d: d.seq).device
        time.sleep(0.02)
    assert victim is not None
    fleet.stop(victim)
    t.join(120)
    assert done == [0]
    s = _status(db, "f1", capsys)
    states = {d["device"]: (d["state"], d["reason"]) for d in s["devices"]}
    assert states["cell-0"][0] == "failed" and "score 0.41" in states["cell-0"][1]
    assert states[victim][0] == "timeout" and "no final ack within 3s" in states[victim][1]
    assert s["counts"] == {"active": 4, "failed": 1, "timeout": 1}
    store.close()
    # Roll it all back. The offline device's deploy expired at the broker, so when it comes
    # back its (queued) rollback is refused by expect_active: it never ran the new bundle.
    v1 = version_id(verify_bundle(sim_bundles.v1, fleet.trusted))
    assert fleet_cli.main(["--db", str(db), "rollback", "f1"]) == 0
    s = _status(db, "f1", capsys)
    assert s["counts"] == {"rolled_back": 4, "failed": 1, "rollback_timeout": 1}
    fleet.start(victim)
    assert fleet_cli.main(["--db", str(db), "rollback", "f1"]) == 0  # re-sent, same id
    s = _status(db, "f1", capsys)
    assert s["state"] == "rolled_back" and s["counts"] == {"rolled_back": 5, "failed": 1}
    gone = next(d for d in s["devices"] if d["device"] == victim)
    assert gone["reason"].startswith("was not running sim-2-") and gone["after"] == v1
    assert {a.slots.active for a in fleet.agents.values()} == {v1}


def test_controller_killed_mid_rollout_resumes(
    broker: Broker, fleet: SimFleet, observer: Observer, sim_bundles: SimBundles,  # noqa: F811
    tmp_path: Path, capsys: Any,
) -> None:
    for i in range(9):
        fleet.start(f"cell-{i}")
    db = tmp_path / "r.db"
    argv = _deploy(broker, db, sim_bundles.v2, sim_bundles.pub, "k1", "--canary", "3",
                   "--batch", "3", "--soak", "1", "--ack-timeout", "20")
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.rollout.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ)
    store = RolloutStore(db)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # SIGKILL right after batch 1's deploys leave
            try:
                record, _ = store.load("k1")
            except Exception:
                time.sleep(0.02)
                continue
            if record.phase == 1:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    record, _devices = store.load("k1")
    assert record.state == "running" and record.phase == 1, record
    store.close()
    capsys.readouterr()
    assert fleet_cli.main(["--broker", broker.url, "--db", str(db), "resume", "k1"]) == 0
    assert "resumed" in capsys.readouterr().out
    s = _status(db, "k1", capsys)
    assert s["state"] == "completed" and s["counts"] == {"active": 9}
    for dev, agent in fleet.agents.items():
        assert (agent.slots.active or "").startswith("sim-2-"), dev
        # Re-sent after the kill maybe, but run once: one `received` per device.
        assert len(observer.rows(what="ack", device=dev, state="received")) == 1, dev
        assert {r[2] for r in observer.rows(what="cmd", device=dev)} == {f"k1.deploy.{dev}"}
    # Resuming a finished rollout is a no-op.
    assert fleet_cli.main(["--broker", broker.url, "--db", str(db), "resume", "k1"]) == 0


def test_controller_verifies_the_bundle_and_reads_tars(
    sim_bundles: SimBundles, tmp_path: Path,  # noqa: F811
) -> None:
    import hashlib
    import shutil
    import tarfile

    from edge_runtime.errors import BundleError
    from edge_runtime.rollout.driver import rollout_spec
    from edge_runtime.signing import load_public_key

    trusted = [load_public_key(sim_bundles.pub)]
    spec = rollout_spec(sim_bundles.v2, trusted, group="lab")
    assert spec.version == version_id(verify_bundle(sim_bundles.v2, trusted))
    tar = tmp_path / "v2.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(sim_bundles.v2, arcname="v2")
    from_tar = rollout_spec(tar, trusted, group="lab", source="https://cdn/v2.tar")
    assert (from_tar.version, from_tar.signer) == (spec.version, spec.signer)
    assert from_tar.sha256 == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert from_tar.bundle == "https://cdn/v2.tar"
    bad = tmp_path / "bad"
    shutil.copytree(sim_bundles.v2, bad)
    (bad / "model" / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(BundleError, match=r"weights\.bin"):
        rollout_spec(bad, trusted, group="lab")
