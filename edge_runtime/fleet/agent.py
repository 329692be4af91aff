"""The device agent: one MQTT connection that reports status and telemetry and runs commands.

    DeviceAgent(AgentConfig(device, broker_url, root), trusted, operators=ops).start()

Only commands signed by an operator key (`operators`, separate from the bundle signers
`trusted`) run: command_auth.py checks signature, target, expiry; the journal the nonce. A
refused payload is acked with `id: null`, its reason and digest, and audited (audit.py,
`root/audit.jsonl`) by digest only, never journaled. Every accepted command and its final
state are audited too, with the signer's key id.

Client id = device id, `clean_start=False` with a session expiry: the broker keeps the
subscriptions and queues QoS 1 commands while the device is away. The Will is a retained
`online: false` status; on connect the agent publishes a retained `online: true` one.

Exactly once (journal.py): paho PUBACKs a QoS 1 message when the handler returns, so the
handler first writes the command into `root/commands.json` and only then returns. A command
is run by the worker thread (paho's network thread must stay free) and its final ack is
stored before it is published; a re-delivered id gets that ack again (`duplicate: true`)
and is not run. A command still pending at start-up (the agent died during it) is resumed:
`Slots.recover` has already put the bundles back into a consistent state, a download
resumes from its part file, and staging is idempotent.

Commands (fleet_messages.py): deploy and rollback (deploy.py; a deploy's bundle may be an
http(s) URL, download.py), set-config (config_update.py: it writes the remote-config
overlay only, never the provisioned file; `on_config` tells the daemon), drain / undrain
(`on_drain`).
The daemon's hooks are all optional: `health_check(path)` raises when a freshly switched
bundle must not serve, `runtime_metrics()` feeds telemetry, `on_switch(path)` is told every
new active bundle, `on_config(config)` every applied config (raise to refuse it: the
previous file is put back; a mapping it returns joins the ack's detail, e.g. which keys
applied live), `on_drain(bool)` every drain change (and the persisted state
at start-up).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import signing
from edge_runtime.atomic import atomic_write_bytes, atomic_write_json
from edge_runtime.config import Config
from edge_runtime.errors import CommandAuthError, ConfigError, EdgeError, MessageError
from edge_runtime.fleet import messages as fm
from edge_runtime.fleet.audit import AUDIT, AuditLog
from edge_runtime.fleet.command_auth import CommandVerifier, payload_digest
from edge_runtime.fleet.config_update import prepare_config, redact, write_config
from edge_runtime.fleet.deploy import Deployer, HealthCheck, default_health_check
from edge_runtime.fleet.download import DownloadPolicy
from edge_runtime.fleet.journal import JOURNAL, CommandJournal
from edge_runtime.fleet.slots import Slots, crash_point
from edge_runtime.fleet.telemetry import HostTelemetry, meminfo
from edge_runtime.mqtt import topics
from edge_runtime.mqtt.client import Message, MqttClient, TlsFiles, Will

log = logging.getLogger(__name__)

AGENT_STATE = "agent.json"
"""{"drained": bool}: survives restarts, so a drained device stays out of service."""


@dataclass(frozen=True)
class AgentConfig:
    device: str
    broker_url: str
    root: Path
    """The device directory: bundle slots, downloads and the command journal."""
    groups: tuple[str, ...] = ()
    """Device groups whose `fleet/group/{group}/cmd` this device obeys."""
    telemetry_interval_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600
    """How long the broker queues commands for an offline device."""
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: TlsFiles | None = None
    """CA, client certificate and key: a broker with `require_certificate` needs the pair."""
    username: str | None = None
    password: str | None = None
    config_path: Path | None = None
    """The daemon's provisioned TOML config: read to validate a set-config, never written
    (None: the defaults)."""
    remote_config: Path | None = None
    """The overlay set-config writes (fleet/remote_config.py: only REMOTE_KEYS, merged over
    config_path at each load); None refuses set-config."""
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    overlay_ignored: str | None = None
    """Why the daemon started without the overlay (it was refused whole): the retained status
    carries it as `remote_config_ignored` until a set-config replaces the overlay."""
    tegrastats: str | None = "auto"
    """Jetson telemetry: "auto" (if on PATH), a path to the binary, or None."""


class DeviceAgent:
    def __init__(
        self,
        config: AgentConfig,
        trusted: list[Ed25519PublicKey],
        health_check: HealthCheck | None = None,
        runtime_metrics: Callable[[], Mapping[str, Any]] | None = None,
        on_switch: Callable[[Path | None], None] | None = None,
        on_drain: Callable[[bool], None] | None = None,
        on_config: Callable[[Config], Mapping[str, Any] | None] | None = None,
        host_telemetry: HostTelemetry | None = None,
        operators: list[Ed25519PublicKey] | None = None,
    ) -> None:
        self.config = config
        self.overlay_ignored = config.overlay_ignored
        self.device = topics.check_device(config.device)
        # Operator keys command this device; `trusted` (bundle signers) only vouch for
        # bundles. With no operator key every command is refused, never run unsigned.
        self.verifier = CommandVerifier(self.device, tuple(config.groups), list(operators or []))
        self.audit = AuditLog(config.root / AUDIT)
        self.trusted = list(trusted)
        self.slots = Slots(config.root / "slots", trusted)
        self.health_check = health_check or default_health_check(trusted)
        self.runtime_metrics = runtime_metrics
        self.on_switch = on_switch
        """Told the new active bundle path after every switch (the daemon reloads there)."""
        self.deployer = Deployer(self.device, self.slots, {signing.key_id(k) for k in trusted},
                                 self.health_check, on_switch, self._ack, config.download)
        self.on_drain = on_drain
        self.on_config = on_config
        self.journal = CommandJournal(config.root / JOURNAL)
        self._state_path = config.root / AGENT_STATE
        self._work: queue.Queue[fm.Command | None] = queue.Queue()
        self._signers: dict[str, str] = {}
        """Key id of each running command's signer, for its final audit record."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._host: HostTelemetry | None = None
        self._shared_host = host_telemetry
        """A host sampler shared by several agents in one process (the fleet simulator);
        it is not ours to close. Default: one of our own, made at start."""
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
        pending = self.journal.pending()
        # Parts of downloads no pending deploy will resume are dead weight on a small disk.
        self.slots.clean_downloads({str(e["params"].get("sha256", "")).lower()
                                    for e in pending if e["type"] == "deploy"})
        if self.drained and self.on_drain is not None:
            self.on_drain(True)  # a drained device stays drained across restarts
        for entry in pending:  # interrupted by a crash: resume
            self._work.put(fm.Command(entry["id"], entry["type"], entry.get("params", {})))
        self._host = self._shared_host or HostTelemetry(tegrastats=self.config.tegrastats)
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
        if self._host is not None and self._host is not self._shared_host:
            self._host.close()

    @property
    def drained(self) -> bool:
        try:
            return bool(json.loads(self._state_path.read_text()).get("drained", False))
        except (OSError, ValueError, AttributeError):
            return False

    # -- network thread -----------------------------------------------------------------

    def _on_connection(self, up: bool) -> None:
        if not up:
            return
        self._publish(topics.fleet_status(self.device), self._status(True), retain=True)
        for entry in self.journal.unacked():  # results that may never have reached anyone
            final = fm.Ack.from_dict(entry["final"])
            self._publish_final(fm.Ack(final.id, self.device, final.state, final.reason,
                                       final.bundle, duplicate=True, detail=final.detail))

    def _on_command(self, msg: Message) -> None:
        digest = payload_digest(msg.payload)
        try:
            doc = fm.decode_command(msg.payload)
            auth = self.verifier.check(doc, msg.topic)
        except (MessageError, CommandAuthError) as e:
            # Not verified: neither journaled nor echoed as if it were ours. The ack's id is
            # null (a forged id must not fail a real command), the claimed id goes in detail.
            claimed = fm.command_id_of(msg.payload)
            self._refused(str(e), digest, claimed, msg.topic)
            return
        try:
            cmd = fm.command_from_dict(doc)
        except MessageError as e:  # signed, so its id is the operator's: answer by it
            cid = doc.get("id") if isinstance(doc.get("id"), str) else None
            cid = cid if cid and len(cid) <= fm.MAX_ID_CHARS else None
            self._audit(cid, str(doc.get("type"))[:32], auth.key_id, "rejected", str(e), digest)
            self._ack(fm.Ack(cid, self.device, "rejected", str(e)))
            return
        try:
            # Durable before we return and paho PUBACKs: a crash now still runs it later.
            entry = self.journal.add(cmd.id, cmd.type, cmd.params, auth.nonce, auth.expires)
        except CommandAuthError as e:  # a replay of a command whose id was pruned
            self._audit(cmd.id, cmd.type, auth.key_id, "rejected", str(e), digest)
            self._ack(fm.Ack(cmd.id, self.device, "rejected", str(e)))
            return
        except (OSError, EdgeError) as e:
            self._ack(fm.Ack(cmd.id, self.device, "rejected", f"cannot record it: {e}"))
            return
        if entry is None:
            self._signers[cmd.id] = auth.key_id
            self._audit(cmd.id, cmd.type, auth.key_id, "accepted", None, digest,
                        target=auth.target)
            self._ack(fm.Ack(cmd.id, self.device, "received"))
            self._work.put(cmd)
        elif entry.get("final") is not None:
            final = fm.Ack.from_dict(entry["final"])
            why = "already handled: a re-delivery or replay is answered, not run again"
            self._audit(cmd.id, cmd.type, auth.key_id, "duplicate", why, digest)
            self._ack(fm.Ack(final.id, self.device, final.state, final.reason or why,
                             final.bundle, duplicate=True, detail=final.detail))
        # else: still pending in this process; it will be acked when it finishes.

    def _refused(self, reason: str, digest: str, claimed: str | None, topic: str) -> None:
        self._audit(None, None, None, "refused", reason, digest, claimed_id=claimed,
                    topic=topic)
        self._ack(fm.Ack(None, self.device, "rejected", reason,
                         detail={"claimed_id": claimed, "digest": digest}))

    def _audit(self, cid: str | None, ctype: str | None, key_id: str | None, outcome: str,
               reason: str | None, digest: str | None = None, **extra: Any) -> None:
        try:
            self.audit.append({"event": "command", "device": self.device, "id": cid,
                               "type": ctype, "key_id": key_id, "outcome": outcome,
                               "reason": reason, "digest": digest, **extra})
        except OSError as e:  # a full disk must not stop the device from answering
            log.error("cannot write the audit log %s: %s", self.audit.path, e)

    # -- worker thread ------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            cmd = self._work.get()
            if cmd is None:
                return
            try:
                final = self._run(cmd)
            except MessageError as e:
                final = fm.Ack(cmd.id, self.device, "rejected", str(e))
            except Exception as e:  # a bug in one command must not stop the agent
                log.exception("command %s failed", cmd.id)
                final = fm.Ack(cmd.id, self.device, "rejected", f"internal error: {e}")
            self.journal.finish(cmd.id, cmd.type, final.to_dict())
            self._audit(cmd.id, cmd.type, self._signers.pop(cmd.id, None), final.state,
                        final.reason, bundle=final.bundle)
            self._publish_final(final)
            if final.state in ("active", "rolled_back", "drained", "undrained", "applied"):
                self._publish(topics.fleet_status(self.device), self._status(True),
                              retain=True)

    def _run(self, cmd: fm.Command) -> fm.Ack:
        if cmd.type == "deploy":
            return self.deployer.deploy(cmd)
        if cmd.type == "set-config":
            return self._set_config(cmd)
        if cmd.type == "rollback":
            return self.deployer.rollback(cmd)
        fm.no_params(cmd)
        if cmd.type in ("drain", "undrain"):
            return self._set_drain(cmd, cmd.type == "drain")
        return self._reject(cmd, f"command type {cmd.type!r} is not supported by this agent")

    def _reject(self, cmd: fm.Command, reason: str) -> fm.Ack:
        return fm.Ack(cmd.id, self.device, "rejected", reason)

    def _set_config(self, cmd: fm.Command) -> fm.Ack:
        cp = fm.config_params(cmd)
        path = self.config.remote_config
        if path is None:
            return self._reject(cmd, "this device's agent manages no config file")
        try:
            update = prepare_config(path, self.config.config_path, toml=cp.toml, keys=cp.set)
        except ConfigError as e:
            return self._reject(cmd, f"invalid config, nothing changed: {e}")
        old = path.read_bytes() if path.exists() else None
        write_config(update)
        crash_point("config:written")
        detail: dict[str, Any] = {"changed": redact(update.changed)}
        if self.on_config is not None:
            try:
                detail.update(self.on_config(update.config) or {})
            except Exception as e:
                if old is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(path, old)
                return self._reject(cmd, f"the daemon refused the config ({type(e).__name__}: "
                                         f"{e}); the previous file is back")
        self.overlay_ignored = None  # a valid overlay now: the status stops reporting one
        return fm.Ack(cmd.id, self.device, "applied", detail=detail)

    def _set_drain(self, cmd: fm.Command, on: bool) -> fm.Ack:
        was = self.drained
        atomic_write_json(self._state_path, {"drained": on})
        if self.on_drain is not None:
            try:
                self.on_drain(on)
            except Exception as e:
                atomic_write_json(self._state_path, {"drained": was})
                return self._reject(cmd, f"the daemon could not {cmd.type}: "
                                         f"{type(e).__name__}: {e}")
        return fm.Ack(cmd.id, self.device, "drained" if on else "undrained",
                      None if was != on else f"already {'drained' if on else 'serving'}")

    # -- telemetry ----------------------------------------------------------------------

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.config.telemetry_interval_s):
            self.publish_telemetry()

    def telemetry(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(system, runtime): host metrics (telemetry.py) and the daemon's own."""
        runtime: dict[str, Any] = {}
        if self.runtime_metrics is not None:
            try:
                runtime = dict(self.runtime_metrics())
            except Exception:
                log.exception("runtime metrics callback failed")
        system = self._host.sample() if self._host is not None else {}
        return system, runtime

    def publish_telemetry(self) -> None:
        system, runtime = self.telemetry()
        payload = fm.telemetry_payload(self.device, system, runtime)
        self._publish(topics.fleet_telemetry(self.device), payload, qos=0)

    # -- helpers ------------------------------------------------------------------------

    def _status(self, online: bool) -> bytes:
        from edge_runtime import __version__
        extra = ({"remote_config_ignored": self.overlay_ignored}
                 if self.overlay_ignored is not None else {})
        return fm.status_payload(
            self.device, online, bundle=self.slots.active, runtime_version=__version__,
            hostname=socket.gethostname(), machine=platform.machine(),
            python=platform.python_version(), cpu_count=os.cpu_count(),
            mem_total_mb=meminfo().get("MemTotal", 0) >> 20, groups=list(self.config.groups),
            drained=self.drained, **extra,
        )

    def _ack(self, ack: fm.Ack) -> None:
        log.info("command %s: %s %s", ack.id, ack.state, ack.reason or "")
        self._publish(topics.fleet_cmd_ack(self.device), ack.to_json())

    def _publish_final(self, ack: fm.Ack) -> None:
        """The final ack; the journal learns when the broker has it (PUBACK)."""
        log.info("command %s: %s %s", ack.id, ack.state, ack.reason or "")
        cid = ack.id
        try:
            self.mqtt.publish(topics.fleet_cmd_ack(self.device), ack.to_json(),
                              on_ack=lambda rc: self.journal.mark_acked(cid) if cid else None)
        except EdgeError as e:  # offline: published again on the next connect
            log.warning("could not publish the result of %s: %s", cid, e)

    def _publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        try:
            self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        except EdgeError as e:  # offline: the final ack is in the journal for a re-delivery
            log.warning("could not publish on %s: %s", topic, e)
