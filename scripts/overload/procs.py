"""Processes of the overload benchmark: Mosquitto (scripts/mosquitto_broker.py), the daemon,
cloud workers; all on loopback.

Every process runs in its own process group (`start_new_session`), logs to a file in the
run's work directory and is stopped by `Procs.close()` (SIGTERM to the group, SIGKILL after a
grace period), which the benchmark calls from a `finally`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from mosquitto_broker import Broker, free_port

__all__ = ["BIN", "Proc", "Procs", "daemon_config", "edge_runtime_cmd", "free_port", "tail"]

BIN = Path(sys.executable).parent


def edge_runtime_cmd() -> list[str]:
    """The installed `edge-runtime` console script, or `python -m edge_runtime` where only
    the source tree is on PYTHONPATH (the GPU machine runs the daemon from a carried tree)."""
    script = BIN / "edge-runtime"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge_runtime"]


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Procs:
    """The processes one benchmark run started; `close()` stops them all."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    device_cpus: set[int] | None = None
    """CPUs the daemon may run on (None: any), so that the "cloud" can have cores of its own."""
    cloud_cpus: set[int] | None = None
    """CPUs the cloud workers may run on (None: any)."""

    def spawn(self, name: str, cmd: list[str], cpus: set[int] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        if cpus:  # taskset execs the command: the pid (and its process group) stay the same
            cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 5.0) -> None:
        if proc.alive():
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.popen.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    # -- the three kinds -----------------------------------------------------------------

    def kill(self, proc: Proc) -> None:
        """SIGKILL the process group at once: no goodbye to the broker or the clients."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def mosquitto(self, port: int | None = None) -> tuple[Proc, str]:
        """Start Mosquitto (on `port` to restart one that was killed: clients come back).

        The shared launcher (scripts/mosquitto_broker.py) writes the config and waits for
        the port; the broker runs in its own process group, like every process here, and is
        tracked as a Proc so that `kill` and `close` treat it as the others."""
        broker = Broker(self.workdir, port=port, own_group=True).start()
        assert broker.proc is not None
        proc = Proc("mosquitto", broker.proc, broker.log)
        self.procs.append(proc)
        return proc, broker.url

    def cloud_worker(
        self, i: int, bundle: Path, pubkey: Path, broker: str, concurrency: int, threads: int,
        chunk: tuple[int, float] = (8, 25.0),
    ) -> Proc:
        """One `edge-runtime cloud-worker`: `concurrency` sequences in one batch, streamed
        tokens coalesced `chunk` = (tokens, ms) per message."""
        return self.spawn(f"cloud-worker-{i}", [
            *edge_runtime_cmd(), "cloud-worker", "--bundle", str(bundle),
            "--pubkey", str(pubkey), "--broker", broker, "--concurrency", str(concurrency),
            "--threads", str(threads), "--chunk-tokens", str(chunk[0]),
            "--chunk-ms", str(chunk[1]), "--log-level", "warning",
        ], self.cloud_cpus)

    def wait_worker(self, proc: Proc, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "cloud worker subscribed" not in tail(proc.log, 100_000):
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not subscribe: {tail(proc.log)}")
            time.sleep(0.1)

    def daemon(self, name: str, config_toml: str, port: int) -> Proc:
        conf = self.workdir / f"{name}.toml"
        conf.write_text(config_toml)
        return self.spawn(name, [
            *edge_runtime_cmd(), "serve", "--config", str(conf), "--port", str(port),
        ], self.device_cpus)

    def wait_daemon(self, proc: Proc, base_url: str, timeout_s: float = 180.0) -> str:
        """Wait for /readyz; the served model's name."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r = httpx.get(f"{base_url}/readyz", timeout=2.0)
                if r.status_code == 200:
                    return str(r.json()["model"])
            except httpx.HTTPError:
                pass
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} did not become ready: {tail(proc.log)}")
            time.sleep(0.1)


def daemon_config(
    *,
    bundle: Path,
    pubkey: Path,
    threads: int,
    max_batch: int,
    max_queue: int,
    default_deadline_s: float,
    broker: str | None,
    cloud_p99_prior_s: float = 2.0,
    safety: float = 1.2,
) -> str:
    """The TOML config of one daemon; offload is on exactly when `broker` is given."""
    lines = [
        "[model]",
        f'bundle = "{bundle}"',
        f'pubkeys = ["{pubkey}"]',
        f"threads = {threads}",
        "",
        "[scheduler]",
        f"max_batch = {max_batch}",
        f"max_queue = {max_queue}",
        f"default_deadline_s = {default_deadline_s:.3f}",
        f"offload_enabled = {'true' if broker else 'false'}",
        f"cloud_p99_prior_s = {cloud_p99_prior_s:.3f}",
        f"safety = {safety:.3f}",
        "",
        "[log]",
        'access_log = ""',
        'level = "warning"',
    ]
    if broker:
        lines += ["", "[offload]", f'broker = "{broker}"', 'device_id = "bench"']
    return "\n".join(lines) + "\n"
