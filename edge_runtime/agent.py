"""The device agent: one MQTT connection that reports status and telemetry and runs commands.

    DeviceAgent(AgentConfig(device, broker_url, root), trusted).start()

Client id = device id, `clean_start=False` with a session expiry: the broker keeps the
subscriptions and queues QoS 1 commands while the device is away. The Will is a retained
`online: false` status; on connect the agent publishes a retained `online: true` one.

Exactly once: paho PUBACKs a QoS 1 message when the handler returns, so the handler first
writes the command into `root/commands.json` (atomic JSON) and only then returns. A command
is run by the worker thread (paho's network thread must stay free) and its final ack is
stored beside it; a re-delivered id gets that ack again (`duplicate: true`) and is not run.
A command still `pending` at start-up (the agent died during it) is resumed: `Slots.recover`
has already put the bundles back into a consistent state, and staging is idempotent.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import fleet_messages as fm
from edge_runtime import signing, topics
from edge_runtime.atomic import atomic_write_json
from edge_runtime.errors import EdgeError, HealthCheckError, MessageError
from edge_runtime.mqtt import Message, MqttClient, TlsFiles, Will
from edge_runtime.slots import Slots, crash_point

log = logging.getLogger(__name__)

HealthCheck = Callable[[Path], None]
"""Raises (any exception) when the bundle at the path must not serve."""
JOURNAL = "commands.json"
_JOURNAL_KEEP = 1000


@dataclass(frozen=True)
class AgentConfig:
    device: str
    broker_url: str
    root: Path
    """The device directory: bundle slots and the command journal."""
    groups: tuple[str, ...] = ()
    """Device groups whose `fleet/group/{group}/cmd` this device obeys."""
    telemetry_interval_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600
    """How long the broker queues commands for an offline device."""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: TlsFiles | None = None
    username: str | None = None
    password: str | None = None


def default_health_check(trusted: list[Ed25519PublicKey]) -> HealthCheck:
    """Verify, load the generator and run a short greedy generation.

    A bundle whose build record holds `health_probe = {"prompt", "expected"}` must
    reproduce `expected` exactly (greedy decoding is deterministic); otherwise 4 tokens
    must come out.
    """

    def check(path: Path) -> None:
        from edge_runtime.bundle import verify_bundle
        from edge_runtime.generator import Generator
        from edge_runtime.sampling import SamplingParams

        bundle = verify_bundle(path, trusted)
        gen = Generator.from_bundle(bundle)
        probe = bundle.manifest.build.get("health_probe")
        if isinstance(probe, dict) and "prompt" in probe and "expected" in probe:
            want = str(probe["expected"])
            n = max(1, len(gen.tokenizer.encode(want)))
            out = gen.generate(gen.text_prompt(str(probe["prompt"])),
                               SamplingParams(max_tokens=n, temperature=0.0))
            if not out.text.startswith(want):
                raise HealthCheckError(f"probe output {out.text[:40]!r} != {want[:40]!r}")
            return
        out = gen.generate(gen.text_prompt("Hello"), SamplingParams(max_tokens=4,
                                                                    temperature=0.0))
        if not out.token_ids:
            raise HealthCheckError("the bundle generated no token")

    return check


class DeviceAgent:
    def __init__(
        self,
        config: AgentConfig,
        trusted: list[Ed25519PublicKey],
        health_check: HealthCheck | None = None,
        runtime_metrics: Callable[[], Mapping[str, Any]] | None = None,
        on_switch: Callable[[Path | None], None] | None = None,
    ) -> None:
        self.config = config
        self.device = topics.check_device(config.device)
        self.trusted = list(trusted)
        self._trusted_ids = {signing.key_id(k) for k in trusted}
        self.slots = Slots(config.root / "slots", trusted)
        self.health_check = health_check or default_health_check(trusted)
        self.runtime_metrics = runtime_metrics
        self.on_switch = on_switch
        """Told the new active bundle path after every switch (the daemon reloads there)."""
        self._journal_path = config.root / JOURNAL
        self._journal = _read_journal(self._journal_path)
        self._lock = threading.Lock()
        self._work: queue.Queue[fm.Command | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cpu = _CpuSampler()
        self.mqtt = MqttClient(
            config.broker_url, self.device, username=config.username,
            password=config.password, tls=config.tls,
            session_expiry_s=config.session_expiry_s, clean_start=False,
            will=Will(topics.fleet_status(self.device),
                      fm.status_payload(self.device, False)),
            reconnect_min_s=config.reconnect_min_s, reconnect_max_s=config.reconnect_max_s,
            on_connection=self._on_connection,
        )
        # Subscribed before start: queued commands arrive right after CONNACK.
        self.mqtt.subscribe(topics.fleet_cmd(self.device), self._on_command)
        for g in config.groups:
            self.mqtt.subscribe(topics.fleet_group_cmd(g), self._on_command)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, wait_s: float | None = None) -> bool:
        self.slots.recover()
        for entry in self._journal.values():  # interrupted by a crash: resume
            if entry.get("final") is None:
                self._work.put(fm.Command(entry["id"], entry["type"], entry.get("params", {})))
        for target in (self._worker, self._telemetry_loop):
            t = threading.Thread(target=target, name=f"agent-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self.mqtt.start(wait_s)

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)
        for t in self._threads:
            t.join(10)
        if self.mqtt.connected:
            try:  # a clean DISCONNECT sends no Will, so say it ourselves
                self.mqtt.publish(topics.fleet_status(self.device), self._status(False),
                                  retain=True, wait_s=2.0)
            except EdgeError as e:
                log.warning("could not publish offline status: %s", e)
        self.mqtt.stop()

    # -- network thread -----------------------------------------------------------------

    def _on_connection(self, up: bool) -> None:
        if up:
            self._publish(topics.fleet_status(self.device), self._status(True), retain=True)

    def _on_command(self, msg: Message) -> None:
        try:
            cmd = fm.parse_command(msg.payload)
        except MessageError as e:
            self._ack(fm.Ack(fm.command_id_of(msg.payload), self.device, "rejected", str(e)))
            return
        with self._lock:
            entry = self._journal.get(cmd.id)
            if entry is None:
                # Durable before we return and paho PUBACKs: a crash now still runs it later.
                self._journal[cmd.id] = {"id": cmd.id, "type": cmd.type,
                                         "params": dict(cmd.params), "final": None}
                self._save_journal()
        if entry is None:
            self._ack(fm.Ack(cmd.id, self.device, "received"))
            self._work.put(cmd)
        elif entry.get("final") is not None:
            final = fm.Ack.from_dict(entry["final"])
            self._ack(fm.Ack(final.id, self.device, final.state, final.reason, final.bundle,
                             duplicate=True))
        # else: still pending in this process; it will be acked when it finishes.

    # -- worker thread ------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            cmd = self._work.get()
            if cmd is None:
                return
            try:
                final = self._run(cmd)
            except Exception as e:  # a bug in one command must not stop the agent
                log.exception("command %s failed", cmd.id)
                final = fm.Ack(cmd.id, self.device, "rejected", f"internal error: {e}")
            with self._lock:
                self._journal.setdefault(cmd.id, {"id": cmd.id, "type": cmd.type})
                self._journal[cmd.id]["final"] = final.to_dict()
                self._save_journal()
            self._ack(final)
            if final.state in ("active", "rolled_back"):
                self._publish(topics.fleet_status(self.device), self._status(True),
                              retain=True)

    def _run(self, cmd: fm.Command) -> fm.Ack:
        def reject(reason: str) -> fm.Ack:
            return fm.Ack(cmd.id, self.device, "rejected", reason)

        if cmd.type == "rollback":
            expect = cmd.params.get("expect_active")
            if expect is not None and expect != self.slots.active:
                # A rollout's rollback must not undo a bundle it never installed.
                return fm.Ack(cmd.id, self.device, "rejected", f"active bundle is "
                              f"{self.slots.active}, not {expect}: nothing to roll back",
                              bundle=self.slots.active)
            try:
                now = self.slots.rollback()
            except EdgeError as e:
                return reject(str(e))
            self._switched()
            return fm.Ack(cmd.id, self.device, "rolled_back", bundle=now)
        if cmd.type != "deploy":
            return reject(f"command type {cmd.type!r} is not supported by this agent yet")
        try:
            p = fm.deploy_params(cmd)
        except MessageError as e:
            return reject(str(e))
        if p.signer not in self._trusted_ids:
            return reject(f"signer {p.signer} is not trusted on this device")
        self._ack(fm.Ack(cmd.id, self.device, "verifying"))
        try:
            version = self.slots.stage(p.bundle, p.sha256, p.signer)
        except (EdgeError, OSError) as e:
            return reject(f"refused before staging: {e}")
        self._ack(fm.Ack(cmd.id, self.device, "staged", bundle=version))
        if self.slots.active == version and self.slots.state()["confirmed"]:
            return fm.Ack(cmd.id, self.device, "active", "already active", bundle=version)
        try:
            self.slots.activate(version)
        except (EdgeError, OSError) as e:
            return reject(f"could not switch: {e}")
        self._switched()
        self._ack(fm.Ack(cmd.id, self.device, "checking", bundle=version))
        crash_point("agent:checking")
        try:
            self.health_check(self.slots.path(version))
        except Exception as e:
            reason = f"health check failed: {type(e).__name__}: {e}"
            try:
                now = self.slots.rollback()
            except EdgeError as e2:
                # No previous bundle: keep the new one rather than nothing at all.
                log.error("cannot roll back %s: %s", version, e2)
                self.slots.commit()
                return reject(f"{reason}; no previous bundle to roll back to")
            self._switched()
            return fm.Ack(cmd.id, self.device, "rolled_back", reason, bundle=now)
        self.slots.commit()
        self.slots.gc()
        return fm.Ack(cmd.id, self.device, "active", bundle=version)

    def _switched(self) -> None:
        if self.on_switch is not None:
            self.on_switch(self.slots.active_path())

    # -- telemetry ----------------------------------------------------------------------

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            self.publish_telemetry()

    def publish_telemetry(self) -> None:
        runtime: Mapping[str, Any] = {}
        if self.runtime_metrics is not None:
            try:
                runtime = self.runtime_metrics()
            except Exception:
                log.exception("runtime metrics callback failed")
        payload = fm.telemetry_payload(self.device, self._cpu.sample(), runtime)
        self._publish(topics.fleet_telemetry(self.device), payload, qos=0)

    # -- helpers ------------------------------------------------------------------------

    def _status(self, online: bool) -> bytes:
        from edge_runtime import __version__

        return fm.status_payload(
            self.device, online, bundle=self.slots.active, runtime_version=__version__,
            hostname=socket.gethostname(), machine=platform.machine(),
            python=platform.python_version(), cpu_count=os.cpu_count(),
            mem_total_mb=_meminfo().get("MemTotal", 0) // 1024, groups=list(self.config.groups),
        )

    def _ack(self, ack: fm.Ack) -> None:
        log.info("command %s: %s %s", ack.id, ack.state, ack.reason or "")
        self._publish(topics.fleet_cmd_ack(self.device), ack.to_json())

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        try:
            self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        except EdgeError as e:  # offline: the final ack is in the journal for a re-delivery
            log.warning("could not publish on %s: %s", topic, e)

    def _save_journal(self) -> None:
        if len(self._journal) > _JOURNAL_KEEP:  # oldest finished entries go first
            done = [k for k, v in self._journal.items() if v.get("final") is not None]
            for k in done[: len(self._journal) - _JOURNAL_KEEP]:
                del self._journal[k]
        atomic_write_json(self._journal_path, {"commands": list(self._journal.values())})


def _read_journal(path: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    # Insertion order is the order commands arrived, which the pruning above relies on.
    return {e["id"]: e for e in doc.get("commands", [])}


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class _CpuSampler:
    """CPU and RAM: psutil when installed, else /proc (CPU share since the last sample)."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def sample(self) -> dict[str, Any]:
        try:
            import psutil

            vm = psutil.virtual_memory()
            return {"cpu_percent": psutil.cpu_percent(None), "mem_used_mb": vm.used >> 20,
                    "mem_total_mb": vm.total >> 20, "load1": os.getloadavg()[0]}
        except ImportError:
            pass
        m = _meminfo()
        total, avail = m.get("MemTotal", 0), m.get("MemAvailable", 0)
        return {"cpu_percent": self._cpu_percent(), "mem_used_mb": (total - avail) >> 20,
                "mem_total_mb": total >> 20, "load1": os.getloadavg()[0]}

    def _cpu_percent(self) -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle, total = fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)
        last, self._last = self._last, (idle, total)
        if last is None or total == last[1]:
            return None
        return round(100.0 * (1 - (idle - last[0]) / (total - last[1])), 1)
