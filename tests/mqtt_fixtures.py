"""Pytest fixtures of a real Mosquitto broker per test, on scripts/mosquitto_broker.py (the
one launcher the tests and the scripts share; `scripts` is on pytest's pythonpath).

    def test_x(broker: Broker):          # persistence off
        client = MqttClient(broker.url, ...)
        broker.kill(); ...; broker.start()   # same port, so clients reconnect by themselves

`persistent_broker` keeps its state on disk across a restart (retained messages, persistent
sessions, queued QoS 1 messages), for the fleet tests that need it; `tls_broker` listens with
TLS only and requires a client certificate signed by a CA made in the test (`make_pki`).
Nothing here is mocked: tests that need the broker are skipped only when `mosquitto` is
missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mosquitto_broker import MOSQUITTO, Broker, Pki, free_port, issue_client, make_pki

__all__ = ["MOSQUITTO", "Broker", "Pki", "broker", "free_port", "issue_client", "make_pki",
           "persistent_broker", "pki", "tls_broker"]


def _broker(tmp_path: Path, persistence: bool, pki: Pki | None = None) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    b = Broker(tmp_path, persistence, pki)
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


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    yield from _broker(tmp_path, persistence=False, pki=pki)
