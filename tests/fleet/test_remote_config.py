"""The remote-config overlay on a device whose provisioned config is read-only, as under the
shipped unit's ProtectSystem=strict: `edge-runtime serve --config` as a process that cannot
write the base file (mode 0444 in a 0555 directory, and, since CI runs as root, started
without the capabilities that let root ignore file modes), a real Mosquitto, signed
set-config commands. The change lands in the overlay, survives a restart, and an overlay
tampered on disk with a key only provisioning may set is refused whole, with the reason
in the log, while the device keeps serving and stays reachable."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agent_fixtures import DEVICE, Controller, operator_pub, serve_process
from bundle_fixtures import BuiltBundle
from mqtt_fixtures import Broker
from test_cli import _read_line

from edge_runtime.config import load_config
from edge_runtime.fleet.messages import Command
from edge_runtime.fleet.remote_config import REMOTE_FILE, load_device_config, read_overlay

# Without these, root writes a 0444 file anyway; a device's daemon runs as its own user.
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def _unprivileged() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:  # util-linux: present wherever CI runs as root
        pytest.fail("running as root needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    return DROP_DAC


def test_set_config_goes_to_the_overlay_survives_a_restart_and_a_tampered_one_is_refused(
    broker: Broker, controller: Controller, tiny_bundle: BuiltBundle, tmp_path: Path,
) -> None:
    etc, state = tmp_path / "etc", tmp_path / "state"
    state.mkdir()
    etc.mkdir()
    base = etc / "config.toml"
    base.write_text(
        "[model]\n"
        f'pubkeys = ["{tiny_bundle.pubkey}"]\n'
        "[fleet]\n"
        "enabled = true\n"
        f'broker = "{broker.url}"\n'
        f'device_id = "{DEVICE}"\n'
        f'root = "{state}"\n'
        f'operator_keys = ["{operator_pub(tmp_path / "trust")}"]\n'
        "telemetry_interval_s = 3600\n"
        'tegrastats = "off"\n')
    base.chmod(0o444)
    etc.chmod(0o555)
    provisioned = base.read_bytes()
    overlay = state / REMOTE_FILE
    exe = Path(sys.executable).with_name("edge-runtime")
    cmd = [*_unprivileged(), str(exe), "serve", "--config", str(base), "--bundle",
           str(tiny_bundle.path), "--port", "0", "--threads", "1", "--access-log", ""]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: list[str] = []

    @contextmanager
    def daemon() -> Iterator[None]:
        log = tmp_path / f"daemon-{len(runs)}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                    env=env)
        try:
            with serve_process(proc, controller):
                line = _read_line(proc, 120)
                assert re.search(r"at http://127\.0\.0\.1:\d+/v1", line), line
                controller.wait(lambda: controller.status.get("online") is True)
                yield
        finally:
            runs.append(log.read_text())
        assert "Traceback" not in runs[-1]

    with daemon():
        # The daemon itself cannot write the base: the check is real, not a mode bit root
        # ignores (the probe runs with the daemon's capabilities).
        probe = subprocess.run([*_unprivileged(), sys.executable, "-c",
                                f"open({str(base)!r}, 'a')"], capture_output=True, text=True,
                               check=False)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr
        controller.send(Command("rc-1", "set-config", {"set": {
            "scheduler.max_queue": 7, "log.level": "debug"}}))
        ack = controller.final("rc-1")
        assert ack.state == "applied", ack.reason
        assert ack.detail is not None
        assert ack.detail["applied_live"] == ["log.level", "scheduler.max_queue"]
        controller.send(Command("rc-2", "set-config", {"set": {"fleet.broker": "mqtt://x:1"}}))
        assert "may not change fleet.broker" in (controller.final("rc-2").reason or "")
    assert base.read_bytes() == provisioned
    assert read_overlay(overlay) == {"scheduler": {"max_queue": 7}, "log": {"level": "debug"}}
    assert overlay.stat().st_mode & 0o777 == 0o600  # atomic.py's temp file: the daemon's alone

    with daemon():  # a restart: the overlay merged at load, before any command
        controller.send(Command("rc-3", "set-config", {"set": {"scheduler.max_queue": 7}}))
        ack = controller.final("rc-3")
        assert ack.state == "applied" and ack.detail is not None
        # Already running with 7: nothing changed on disk and nothing to apply live.
        assert (ack.detail["changed"], ack.detail["applied_live"]) == ({}, [])
    assert " DEBUG " in runs[-1]  # log.level from the overlay ruled from the first line

    # Tampered on disk (a hand edit, a compromised daemon): a protected key beside a
    # permitted one. The daemon refuses the overlay whole and runs on the provisioned file.
    overlay.write_text('[log]\nlevel = "debug"\n[fleet]\nbroker = "mqtt://127.0.0.1:9"\n')
    with daemon():  # online: it connected to the provisioned broker, not the planted one
        # The operator sees it without reading the device's log: the retained status says so.
        controller.wait(lambda: "only provisioning may set" in str(
            controller.status.get("remote_config_ignored")))
        assert "sets fleet.broker" in str(controller.status["remote_config_ignored"])
        controller.send(Command("rc-4", "set-config", {"set": {"log.level": "warning"}}))
        r = controller.final("rc-4")
        assert r.state == "rejected" and "send a whole document" in (r.reason or "")
        controller.send(Command("rc-5", "set-config", {"toml": "[scheduler]\nmax_queue = 5\n"}))
        ack = controller.final("rc-5")
        assert ack.state == "applied", ack.reason
        assert ack.detail is not None and ack.detail["applied_live"] == ["scheduler.max_queue"]
        # A valid overlay again: the status republished without the note.
        controller.wait(lambda: "remote_config_ignored" not in controller.status)
    log = runs[-1]
    assert "sets fleet.broker, which only provisioning may set: ignored whole" in log
    assert " ERROR " in log and " DEBUG " not in log  # its log.level was not merged either
    assert read_overlay(overlay) == {"scheduler": {"max_queue": 5}}
    assert base.read_bytes() == provisioned
    loaded = load_device_config(base, {})
    assert loaded.ignored is None and loaded.config.scheduler.max_queue == 5
    assert load_config(base).scheduler.max_queue != 5  # the base alone never changed
