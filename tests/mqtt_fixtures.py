"""A real Mosquitto broker per test: generated config, free loopback port, kill and restart.

    def test_x(broker: Broker):          # persistence off
        client = MqttClient(broker.url, ...)
        broker.kill(); ...; broker.start()   # same port, so clients reconnect by themselves

`persistent_broker` keeps its state on disk across a restart (retained messages, persistent
sessions), for the fleet tests that need it. Nothing here is mocked: tests that need the
broker are skipped only when the `mosquitto` binary is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, workdir: Path, persistence: bool = False) -> None:
        assert MOSQUITTO is not None
        self.port = free_port()
        self.workdir = workdir
        self.log = workdir / "mosquitto.log"
        self.config = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {workdir}/",
            "log_type error",
            "log_type warning",
            "log_dest stderr",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to its own user, losing workdir
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start on this broker's port and wait until it accepts connections."""
        assert not self.running
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"mosquitto did not start on port {self.port}: "
                        f"{self.log.read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT, no Will delay courtesy; clients see the socket close."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()


def _broker(tmp_path: Path, persistence: bool) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path, persistence)
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    yield from _broker(tmp_path, persistence=False)


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Broker]:
    yield from _broker(tmp_path, persistence=True)
