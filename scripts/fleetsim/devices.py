"""Simulated devices: real DeviceAgents (real MQTT, real slots on disk) with a fake model.

    make_sim_bundle(out, key, version="2", quality=0.9, error_rate=0.005, fail_share=0.1)
    agent = sim_agent(device, broker_url, root, trusted, group="sim")

A sim bundle is a real signed bundle (manifest, signature, a small weights file) whose
build record holds `sim`: the metrics a device serving it reports in telemetry, and the
share of devices on which its quality probe fails. Which devices fail is a hash of the
device id and the bundle version, so a run is reproducible and the same device fails the
same bundle every time. Everything else — staging, verification, the atomic switch, the
command journal, acks, retained status, Last Will — is the production agent's own code.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.bundle.manifest import MANIFEST, write_bundle
from edge_runtime.errors import HealthCheckError
from edge_runtime.fleet.agent import AgentConfig, DeviceAgent
from edge_runtime.fleet.slots import Slots
from edge_runtime.fleet.telemetry import HostTelemetry

GOOD = {"quality": 0.90, "error_rate": 0.005, "ttft_p95_ms": 310.0, "tokens_per_s": 30.0}


def make_sim_bundle(out: Path, key: Ed25519PrivateKey, version: str, *, fail_share: float = 0.0,
                    payload_bytes: int = 4096, **metrics: float) -> Path:
    """A signed bundle of a fake model; `metrics` override GOOD's telemetry values."""
    sim = {**GOOD, **metrics, "fail_share": fail_share}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.bin"
        # Content depends on the version, so two versions never share a manifest hash.
        seed = hashlib.sha256(f"sim-{version}".encode()).digest()
        weights.write_bytes((seed * (payload_bytes // len(seed) + 1))[:payload_bytes])
        tok = Path(tmp) / "tokenizer.json"
        tok.write_text(json.dumps({"version": "1.0", "model": {"type": "sim"}}))
        fields = {
            "name": "sim", "version": version, "task": "text-generation",
            "tokenizer": {"file": "tokenizer/tokenizer.json", "config_file": None,
                          "chat_template": None, "bos_token": None, "eos_token": None},
            "generation": {"eos_token_ids": [0], "context_length": 64},
            "graphs": {}, "build": {"sim": sim},
        }
        return write_bundle(out, {"model/weights.bin": weights,
                                  "tokenizer/tokenizer.json": tok}, fields, key)


def _sim_record(bundle_dir: Path) -> Mapping[str, Any]:
    doc = json.loads((bundle_dir / MANIFEST).read_text())
    return dict(doc.get("build", {}).get("sim", GOOD))


def unit(*parts: str) -> float:
    """A deterministic number in [0, 1) from strings."""
    h = hashlib.sha256("/".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def sim_health_check(device: str) -> Any:
    def check(path: Path) -> None:
        sim = _sim_record(path)
        version = json.loads((path / MANIFEST).read_text())["version"]
        if unit(device, version, "probe") < float(sim.get("fail_share", 0.0)):
            q = float(sim["quality"])
            raise HealthCheckError(f"quality probe: score {q * 0.6:.2f} below the bundle's "
                                   f"threshold {q * 0.9:.2f}")

    return check


def sim_metrics(agent: DeviceAgent) -> Any:
    """Telemetry of whatever bundle is active, with a little per-device spread."""
    cache: dict[str, Mapping[str, Any]] = {}

    def metrics() -> Mapping[str, Any]:
        active = agent.slots.active
        if active is None:
            return {}
        if active not in cache:
            cache[active] = _sim_record(agent.slots.path(active))
        sim = cache[active]
        jitter = 0.9 + 0.2 * unit(agent.device, active, "jitter")
        return {"bundle": active, "quality": round(float(sim["quality"]) * (0.98 + 0.04 * (
                    jitter - 0.9) / 0.2), 4),
                "error_rate": round(float(sim["error_rate"]) * jitter, 5),
                "ttft_p95_ms": round(float(sim["ttft_p95_ms"]) * jitter, 1),
                "tokens_per_s": round(float(sim["tokens_per_s"]) / jitter, 2)}

    return metrics


def provision(root: Path, bundle: Path, trusted: list[Ed25519PublicKey]) -> None:
    """The device's first bundle, as flashing would leave it (active, confirmed)."""
    if (root / "slots" / "state.json").exists():
        return
    slots = Slots(root / "slots", trusted, margin_bytes=0)
    slots.activate(slots.stage(bundle))
    slots.commit()


class SharedHost(HostTelemetry):
    """One process's host sample, shared by all its simulated devices: they sit on the same
    machine, and a thousand agents each reading /proc every interval would measure the
    simulator's own cost instead of the rollout's. Sampled at most once a second."""

    def __init__(self) -> None:
        super().__init__(tegrastats=None, nvml=False)
        self._lock = threading.Lock()
        self._at = -1.0
        self._last: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._at >= 1.0:
                self._last, self._at = super().sample(), time.monotonic()
            return dict(self._last)


def sim_agent(device: str, broker_url: str, root: Path, trusted: list[Ed25519PublicKey], *,
              group: str = "sim", telemetry_interval_s: float = 1.0,
              health_check: Any = None, host: HostTelemetry | None = None,
              operators: list[Ed25519PublicKey] | None = None) -> DeviceAgent:
    cfg = AgentConfig(device, broker_url, root, groups=(group,),
                      telemetry_interval_s=telemetry_interval_s, reconnect_min_s=0.2,
                      reconnect_max_s=5.0)
    agent = DeviceAgent(cfg, trusted, health_check=health_check or sim_health_check(device),
                        host_telemetry=host, operators=operators)
    agent.runtime_metrics = sim_metrics(agent)
    return agent


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (each agent holds a socket and a few files)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


__all__ = ["SharedHost", "make_sim_bundle", "provision", "raise_fd_limit", "sim_agent"]
