"""The fleet agent inside the daemon (`edge-runtime serve --fleet`): the daemon serves the
active bundle slot and hot-swaps to what the fleet deploys, without failing a request.

What the daemon does at each step of a deploy run by the agent (agent.py):

    agent                                      daemon (this module)
    stage: verify hash + signature, copy       -
    activate (unconfirmed) ── on_switch ─────▶ load + warm up the new generator beside the
                                               serving one and probe it (probe.py: quality
                                               + latency) before any request reaches it;
                                               passed → LocalWorker.swap (atomic for new
                                               requests; running ones finish on the old)
    health_check ────────────────────────────▶ the probe's verdict and numbers, and one
                                               request through the serving path (readiness)
    commit, or rollback ── on_switch(old) ───▶ a failed bundle never served: nothing to do

So a bundle that fails its probe never answers a client, and the probe costs no second copy
of the model. A switch to a bundle whose slot is already confirmed (an operator's rollback,
recovery) is not probed: it served before.

The other commands (docs/FLEET.md):

    drain / undrain ── on_drain ─────────────▶ LocalWorker.drained: the API admits no new
                                               request (cloud if the offload path is up,
                                               else 503 + Retry-After); queued and running
                                               ones finish (the ack waits for them, up to
                                               DRAIN_WAIT_S); /readyz says 503 "drained".
                                               A persisted drain holds from start-up on.
    set-config ── writes the overlay ─ on_config▶ live_config.py: the keys that can change
                                               live are applied at once, under one lock;
                                               the ack's detail lists them and the keys
                                               that wait for a restart.

The provisioned config is the file `serve --config` loaded, else `{fleet.root}/config.toml`
(CONFIG_FILE) when it exists; the agent reads it and never writes it (read-only under the
unit's ProtectSystem=strict). set-config writes the overlay (remote_config.py, default
`{fleet.root}/remote.toml`), which `serve` merges over that file at every start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.api.metrics import Metrics
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.config import Config, FleetConfig
from edge_runtime.errors import ConfigError, EdgeError, HealthCheckError
from edge_runtime.fleet.agent import AgentConfig, DeviceAgent
from edge_runtime.fleet.download import DownloadPolicy
from edge_runtime.fleet.live_config import plan_config
from edge_runtime.fleet.remote_config import overlay_path
from edge_runtime.fleet.slots import Slots
from edge_runtime.fleet.telemetry import RUNTIME_FIELDS
from edge_runtime.model import probe
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.mqtt.client import broker_credentials
from edge_runtime.pki import check_device_cert
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo, Request
from edge_runtime.serving.scheduler import Action

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

READINESS_TIMEOUT_S = 30.0
DRAIN_WAIT_S = 60.0
"""How long a drain waits for the requests in flight before it acks anyway."""
SLOTS = "slots"
"""Under fleet.root, as the agent keeps them."""
CONFIG_FILE = "config.toml"
"""Under fleet.root: the config set-config writes when `serve` was given no --config."""


def install_initial(slots: Slots, bundle: Path | None) -> Path:
    """The bundle to serve at start-up: the active slot after recovery, or on first boot
    `bundle` installed (verified, staged, activated, committed) as the first active slot."""
    active = slots.recover()
    if active is None:
        if bundle is None:
            raise ConfigError(f"no active bundle in {slots.root} and no --bundle to install")
        active = slots.stage(bundle)
        slots.activate(active)
        slots.commit()
        log.info("first boot: installed %s as the active bundle", active)
    elif bundle is not None:
        log.info("serving the active slot %s (--bundle is only installed on first boot)", active)
    return slots.path(active)


class FleetServing:
    """The DeviceAgent hooks of a serving daemon (see the module docstring)."""

    def __init__(
        self,
        worker: LocalWorker,
        trusted: list[Ed25519PublicKey],
        serving: Path,
        limits: probe.ProbeThresholds | None = None,
        metrics: Metrics | None = None,
        backend: str = "auto",
        threads: int | None = None,
        config: Config | None = None,
        flags: Mapping[str, Any] | None = None,
        cloud_path: bool = False,
    ) -> None:
        """`config`: the one the daemon runs; `flags`: its command-line overrides (they win
        over a file set-config writes, now and at a restart); `cloud_path`: an offload
        client exists (so offload can be turned on live)."""
        self.worker = worker
        self.trusted = list(trusted)
        self.limits = limits or probe.ProbeThresholds()
        self.metrics = metrics
        self.backend, self.threads = backend, threads
        self.serving: Path = serving
        """The slot whose bundle new requests go to."""
        self.last_probe: probe.ProbeResult | None = None
        """The numbers of the last deploy's probe, passed or not (telemetry carries them)."""
        self._verdict: tuple[Path, probe.ProbeResult | None, BaseException | None] | None = None
        self.agent: DeviceAgent | None = None
        self.config = config or Config()
        self.flags = dict(flags or {})
        self.cloud_path = cloud_path
        self._config_lock = threading.Lock()
        self._life = threading.Lock()
        self._stopping = False
        self._started = False

    def make_agent(self, config: AgentConfig) -> DeviceAgent:
        def check(path: Path) -> Any:
            # The probe's numbers as a mapping: an agent that puts the health check's result
            # into its final ack reports them; telemetry carries them (`probe`) in any case.
            result = self.health_check(path)
            return result.to_dict() if result is not None else None

        from edge_runtime.signing import load_public_keys

        operators = load_public_keys(self.config.fleet.operator_keys)
        if not operators:
            log.warning("no operator key configured ([fleet] operator_keys): the agent "
                        "refuses every fleet command until provisioning adds one")
        self.agent = DeviceAgent(config, self.trusted, health_check=check,
                                 runtime_metrics=self.runtime_metrics, on_switch=self.on_switch,
                                 on_drain=self.on_drain, on_config=self.on_config,
                                 operators=operators)
        if self.agent.drained:  # before the first request: the agent itself starts later
            self.on_drain(True)
        return self.agent

    # -- lifecycle (the app's lifespan) --------------------------------------------------

    def start(self) -> None:
        """Start the agent once the model is warm, in the background: a deploy it resumes
        after a crash then swaps into a running worker, and start-up is not held up."""
        threading.Thread(target=self._start_when_ready, name="fleet-start", daemon=True).start()

    def _start_when_ready(self) -> None:
        while not self.worker.wait_ready(0.1):
            if self._stopping or self.worker.error is not None:
                return
        with self._life:
            if self._stopping or self.agent is None:
                return
            self.agent.start()  # connects in the background and keeps retrying
            self._started = True
        log.info("fleet agent %s started on %s", self.agent.device,
                 self.agent.config.broker_url)

    def stop(self) -> None:
        with self._life:
            self._stopping = True
            if self._started and self.agent is not None:
                self.agent.stop()

    # -- agent hooks (agent worker thread) ------------------------------------------------

    def on_switch(self, path: Path | None) -> None:
        """Load, probe (unconfirmed slots only) and swap to `path`; never raises: a failure
        is kept for `health_check`, and the daemon keeps serving what it served."""
        if path is None:
            return
        from edge_runtime.model.generator import Generator

        unconfirmed = self.agent is not None and not self.agent.slots.state()["confirmed"]
        if path == self.serving:
            # Already serving it: a resumed deploy whose slot nothing has vouched for yet is
            # probed on a generator of its own (the serving one belongs to the engine loop).
            self._verdict = (path, None, None)
            if unconfirmed:
                self._probe_beside(path)
            return
        result: probe.ProbeResult | None = None
        gen: Generator | None = None
        try:
            bundle = verify_bundle(path, self.trusted)
            gen = Generator.from_bundle(bundle, backend=self.backend, threads=self.threads)
            gen.warmup()
            if unconfirmed:
                result = probe.measure(gen, probe.load_reference(bundle))
                log.info("probe of %s: %s", path.name, result.to_dict())
                self.last_probe = result
                probe.check(result, self.limits)
            self.worker.swap(gen, ModelInfo.from_bundle(bundle))
        except Exception as e:  # kept for health_check, which reports it and rolls back
            log.error("not switching to %s: %s: %s", path.name, type(e).__name__, e)
            self._verdict = (path, result, e)
            if gen is not None:
                gen.engine.close()  # its memory back now, not at the next collection
            return
        self.serving = path
        self._verdict = (path, result, None)

    def on_drain(self, on: bool) -> None:
        """Admit no new request (or again); a drain returns once the requests in flight are
        done, so its ack means the device is idle (or DRAIN_WAIT_S passed)."""
        self.worker.drained = on
        log.warning("drained: new requests are refused or sent to the cloud" if on
                    else "undrained: serving again")
        deadline = time.monotonic() + DRAIN_WAIT_S
        while on and self.worker.depth and time.monotonic() < deadline:
            time.sleep(0.05)
        if on and self.worker.depth:
            log.warning("drained with %d requests still in flight after %.0f s",
                        self.worker.depth, DRAIN_WAIT_S)

    def on_config(self, file_config: Config) -> dict[str, list[str]]:
        """Apply the live keys of the config the agent just wrote (live_config.py); raise
        ConfigError, changing nothing, for a config this daemon must not run."""
        with self._config_lock:
            plan = plan_config(self.config, file_config, self.flags, self.cloud_path)
            target = plan.target
            if not target.fleet.enabled:
                raise ConfigError("the config turns the fleet agent off (fleet.enabled = "
                                  "false): the device would be unreachable after a restart")
            # What a restart would fail on is refused now, while the old file can come back.
            agent_config(target)
            target.server.resolved_api_key()
            new, old = plan.running, self.config
            if new.scheduler != old.scheduler:
                self.worker.reconfigure(new.scheduler)
            if new.log.level != old.log.level:
                logging.getLogger().setLevel(new.log.level.upper())
            if self.agent is not None and new.fleet.telemetry_interval_s != \
                    old.fleet.telemetry_interval_s:
                # The agent reads its interval before each wait.
                self.agent.config = dataclasses.replace(
                    self.agent.config, telemetry_interval_s=new.fleet.telemetry_interval_s)
            if new.fleet.thresholds() != old.fleet.thresholds():
                self.limits = new.fleet.thresholds()
            self.config = new
        log.info("config applied: %s", plan.detail())
        return plan.detail()

    def _probe_beside(self, path: Path) -> None:
        try:
            bundle = verify_bundle(path, self.trusted)
            result = probe.probe_bundle(bundle, self.limits, self.backend, self.threads)
        except Exception as e:
            self._verdict = (path, None, e)
            return
        self.last_probe = result
        self._verdict = (path, result, None)

    def health_check(self, path: Path) -> probe.ProbeResult | None:
        """The probe's verdict on `path`, then readiness through the serving path."""
        verdict = self._verdict
        if verdict is None or verdict[0] != path:
            raise HealthCheckError(f"the daemon did not switch to {path.name}")
        _, result, error = verdict
        if isinstance(error, HealthCheckError):
            raise error
        if error is not None:
            raise HealthCheckError(f"{path.name} cannot serve: {type(error).__name__}: {error}")
        self._readiness()
        return result

    def runtime_metrics(self) -> Mapping[str, Any]:
        """The daemon's own numbers for the agent's telemetry."""
        model = self.worker.model
        out: dict[str, Any] = dict.fromkeys(RUNTIME_FIELDS)  # every name, null if unmeasured
        if self.metrics is not None:
            out.update(self.metrics.recent.snapshot())
        out.update(
            ready=self.worker.ready,
            drained=self.worker.drained,
            queue_depth=self.worker.depth,
            bundle=self.serving.name,
            bundle_version=model.version if model else None,
        )
        if self.last_probe is not None:
            out["quality_drop"] = self.last_probe.quality_drop
            out["probe"] = self.last_probe.to_dict()
        return out

    # -- helpers --------------------------------------------------------------------------

    def _readiness(self) -> None:
        """One short greedy request through the worker, as a client's would run."""
        gen = self.worker.generator
        if gen is None or not self.worker.ready:
            raise HealthCheckError("the daemon is not ready")

        async def once() -> None:
            req = Request(id=f"health-{uuid.uuid4().hex[:8]}", prompt_ids=gen.text_prompt("Hi"),
                          params=SamplingParams(max_tokens=2, temperature=0.0),
                          loop=asyncio.get_running_loop(), generator=gen)
            try:
                decision = self.worker.submit(req)
            except EdgeError as e:  # busy is not broken: the probe has already run
                log.info("readiness request not served locally: %s", e)
                return
            if decision.action is not Action.LOCAL:
                log.info("readiness request sent to %s: %s", decision.action, decision.reason)
                return
            try:
                async for _ in req.chunks():
                    pass
            finally:
                req.cancel()

        try:
            asyncio.run(asyncio.wait_for(once(), READINESS_TIMEOUT_S))
        except asyncio.TimeoutError as e:  # not the builtin TimeoutError on Python 3.10
            raise HealthCheckError(f"no answer within {READINESS_TIMEOUT_S} s") from e
        except EdgeError as e:
            raise HealthCheckError(f"the serving path failed: {e}") from e


def attach(app: FastAPI, worker: LocalWorker, cfg: Config, trusted: list[Ed25519PublicKey],
           serving: Path, config_path: Path, flags: Mapping[str, Any] | None = None,
           cloud_path: bool = False, overlay_ignored: str | None = None) -> FleetServing:
    """The fleet agent of `serve --fleet`, wired into `app` (whose lifespan starts it);
    `overlay_ignored`: why serve started without the remote-config overlay."""
    hooks = FleetServing(worker, trusted, serving, cfg.fleet.thresholds(), app.state.metrics,
                         cfg.model.backend, cfg.model.threads, cfg, flags, cloud_path)
    check_own_certificate(cfg.fleet)
    hooks.make_agent(agent_config(cfg, config_path, overlay_path(cfg.fleet), overlay_ignored))
    app.state.fleet = hooks
    return hooks


def config_path(fleet_root: Path, given: Path | None) -> Path:
    """The provisioned config: `serve --config`'s, else CONFIG_FILE under the root."""
    return given if given is not None else fleet_root / CONFIG_FILE


def check_own_certificate(f: FleetConfig) -> list[str]:
    """At start, the device's own certificate through the doctor's check (pki): expired, not
    yet valid, expiring within pki.EXPIRY_WARNING, another CA, a wrong key. Each is an ERROR
    in the log (the broker will refuse, or soon refuse, this device) but not a refusal to
    start: the device still serves locally and the operator sees the line. Returned for
    tests; no key material in any message."""
    if not (f.cert_file and f.key_file and f.ca_file):
        return []
    try:
        c = check_device_cert(Path(f.cert_file), Path(f.key_file), Path(f.ca_file))
        lines = c.problems + c.warnings
    except EdgeError as e:
        lines = [str(e)]
    for line in lines:
        log.error("the fleet broker will refuse this device's certificate: %s", line)
    return lines


def agent_config(cfg: Config, config_path: Path | None = None,
                 remote_config: Path | None = None,
                 overlay_ignored: str | None = None) -> AgentConfig:
    """The DeviceAgent's settings from [fleet] (and [offload]'s device id); `config_path`
    is the provisioned file set-config validates against, `remote_config` the overlay it
    writes (None: set-config is refused)."""
    f: FleetConfig = cfg.fleet
    if f.broker is None or f.root is None:
        raise ConfigError("the fleet agent needs fleet.broker and fleet.root")
    password, tls = broker_credentials("fleet", f.password_file, f.ca_file, f.cert_file,
                                       f.key_file)
    device = f.device_id or cfg.offload.device_id or socket.gethostname().split(".")[0]
    download = DownloadPolicy(timeout_s=f.download_timeout_s, attempts=f.download_attempts,
                              ca_file=str(f.download_ca_file) if f.download_ca_file else None)
    if f.download_ca_file is not None and not f.download_ca_file.is_file():
        raise ConfigError(f"fleet.download_ca_file {f.download_ca_file} is not a file")
    return AgentConfig(device, f.broker, f.root, groups=f.groups,
                       telemetry_interval_s=f.telemetry_interval_s,
                       session_expiry_s=f.session_expiry_s, tls=tls, username=f.username,
                       password=password, config_path=config_path,
                       remote_config=remote_config, download=download,
                       overlay_ignored=overlay_ignored,
                       tegrastats=None if f.tegrastats == "off" else f.tegrastats)
