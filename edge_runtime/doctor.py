"""`edge-runtime doctor`: is this machine ready to serve on its GPU and reach its fleet?

One line per check, each with its fix: the JetPack/L4T release, CUDA, TensorRT, ONNX
Runtime's execution providers, the power mode, free memory and disk, the fleet broker
(TCP, TLS with the device certificate, MQTT CONNECT), the device certificate (validity,
chain to the CA, key match) and the remote-config overlay that signed set-config commands
write (merged, or refused whole and why). It only reads: nothing is written, no key
material is printed. On a Jetson a missing GPU piece fails; elsewhere (an x86 box serving on
the CPU) it warns.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge_runtime.config import Config
from edge_runtime.engines.providers import GPU_PROVIDERS, provider_report, tensorrt_version
from edge_runtime.errors import EdgeError

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# L4T release -> JetPack (NVIDIA's release notes); an unknown one is shown as L4T only.
JETPACK = {"36.3": "6.0", "36.4": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "38.2": "7.0"}
MIN_FREE_MEM = 2 << 30
MIN_FREE_DISK = 4 << 30


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"[{self.status:>4}] {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix else text


def l4t_release(path: Path = TEGRA_RELEASE) -> str | None:
    """'36.4.3' from '# R36 (release), REVISION: 4.3, ...'; None off a Jetson."""
    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else text.strip()[:60]


def _jetpack(release: str) -> str | None:
    parts = release.split(".")
    for n in (3, 2):
        if ".".join(parts[:n]) in JETPACK:
            return JETPACK[".".join(parts[:n])]
    return None


def check_release(jetson: bool) -> Check:
    rel = l4t_release()
    if rel is None:
        return Check("JetPack/L4T", SKIP, f"not a Jetson (no {TEGRA_RELEASE})")
    jp = _jetpack(rel)
    if jp is None:
        return Check("JetPack/L4T", WARN, f"L4T {rel}: a release this runtime was not tested on",
                     "flash JetPack 6.2 (L4T 36.4.3) or later (README § Jetson)")
    return Check("JetPack/L4T", OK, f"L4T {rel} (JetPack {jp})")


def _cuda_runtime_version() -> str | None:
    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v, n = ctypes.c_int(), ctypes.c_int()
        if lib.cudaRuntimeGetVersion(ctypes.byref(v)) != 0:
            continue
        version = f"{v.value // 1000}.{v.value % 1000 // 10}"
        # A runtime without a visible GPU (x86 box, container without --runtime nvidia).
        if lib.cudaGetDeviceCount(ctypes.byref(n)) != 0 or n.value == 0:
            return f"{version}, but no GPU visible"
        return f"{version}, {n.value} GPU(s)"
    return None


def check_cuda(jetson: bool) -> Check:
    v = _cuda_runtime_version()
    if v is not None and "no GPU" not in v:
        return Check("CUDA", OK, f"runtime {v}")
    if v is not None:
        return Check("CUDA", FAIL if jetson else WARN, f"runtime {v}",
                     "check /dev/nvhost-* permissions (user in group video)" if jetson
                     else "none needed to serve on the CPU")
    return Check("CUDA", FAIL if jetson else WARN, "no CUDA runtime (libcudart) can be loaded",
                 "install JetPack's CUDA (sudo apt install nvidia-jetpack)" if jetson
                 else "none needed to serve on the CPU; for a GPU install the CUDA toolkit")


def check_tensorrt(jetson: bool) -> Check:
    version = tensorrt_version()
    if version is not None:
        return Check("TensorRT", OK, f"python module {version}")
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return Check("TensorRT", WARN, f"{name} present but not its Python module",
                     "sudo apt install python3-libnvinfer; create the venv with "
                     "--system-site-packages")
    return Check("TensorRT", FAIL if jetson else WARN, "not installed",
                 "sudo apt install nvidia-tensorrt python3-libnvinfer" if jetson
                 else "optional: the TensorRT backend needs an NVIDIA GPU (docs/TENSORRT.md)")


def check_providers(jetson: bool) -> Check:
    report = provider_report()
    if report.version is None:
        return Check("ONNX Runtime", FAIL, "not installed",
                     "onnxruntime-gpu from NVIDIA's Jetson index (README § Jetson)" if jetson
                     else "pip install 'edge-runtime[cpu]'")
    gpu = [p for p in GPU_PROVIDERS if p in report.offered]
    detail = report.line()
    if gpu:
        return Check("ONNX Runtime", OK, detail)
    return Check("ONNX Runtime", FAIL if jetson else WARN, detail,
                 "pip uninstall onnxruntime, then install onnxruntime-gpu from NVIDIA's Jetson "
                 "index (README § Jetson)" if jetson else "CPU only: fine on x86")


def check_power(jetson: bool) -> Check:
    exe = shutil.which("nvpmodel")
    if exe is None:
        if not jetson:
            return Check("power mode", SKIP, "no nvpmodel (not a Jetson)")
        return Check("power mode", WARN, "nvpmodel not found", "sudo apt install nvidia-l4t-tools")
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("power mode", WARN, f"nvpmodel -q failed: {e}", "run doctor as root")
    m = re.search(r"NV Power Mode:\s*(\S+)", out)
    mode = m.group(1) if m else out.strip().splitlines()[0] if out.strip() else "?"
    if "MAXN" in mode.upper():
        return Check("power mode", OK, mode)
    return Check("power mode", WARN, f"{mode}: not the fastest mode",
                 "sudo nvpmodel -m 0 && sudo jetson_clocks (AGX Orin: mode 0 = MAXN)")


def check_memory() -> Check:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError) as e:
        return Check("memory", WARN, f"cannot read /proc/meminfo: {e}")
    gib = avail / (1 << 30)
    if avail < MIN_FREE_MEM:
        return Check("memory", FAIL, f"{gib:.1f} GiB available",
                     "stop other workloads or serve a smaller bundle")
    return Check("memory", OK, f"{gib:.1f} GiB available")


def check_disk(path: Path) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    gib = free / (1 << 30)
    if free < MIN_FREE_DISK:
        return Check("disk", FAIL, f"{gib:.1f} GiB free at {probe}",
                     "free space: a bundle update needs room for two slots plus the download")
    return Check("disk", OK, f"{gib:.1f} GiB free at {probe}")


def _mqtt_connect(sock: socket.socket, client_id: str) -> int:
    """A minimal MQTT 5 CONNECT; the CONNACK's reason code (0 = accepted)."""
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x05\x02\x00\x0a\x00"  # v5, clean start, keepalive 10, no props
    payload = struct.pack("!H", len(cid)) + cid
    body = var + payload
    if len(body) > 127:  # one-byte remaining length; device ids are short
        raise OSError(f"client id {client_id!r} is too long")
    sock.sendall(b"\x10" + bytes([len(body)]) + body)
    head = sock.recv(2)
    if len(head) < 2 or head[0] != 0x20:
        raise OSError("the broker did not answer CONNECT with CONNACK")
    rest = sock.recv(head[1])
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    return rest[1] if len(rest) > 1 else 255


def check_broker(cfg: Config, timeout: float = 5.0) -> list[Check]:
    f = cfg.fleet
    if f.broker is None:
        return [Check("broker", SKIP, "no [fleet] broker configured")]
    url = urlsplit(f.broker)
    host, tls = url.hostname or "", url.scheme == "mqtts"
    port = url.port or (8883 if tls else 1883)
    checks: list[Check] = []
    if not tls:
        checks.append(Check("broker", WARN, f"{f.broker} is not TLS",
                            "use mqtts://HOST:8883 with ca_file/cert_file/key_file"))
    if tls and f.cert_file and f.key_file and f.ca_file:
        from edge_runtime.pki import check_device_cert

        try:
            c = check_device_cert(f.cert_file, f.key_file, f.ca_file)
        except EdgeError as e:
            checks.append(Check("certificate", FAIL, str(e), "re-provision the device"))
            return checks
        want = f.device_id or socket.gethostname()
        if c.cn != want:
            c.problems.append(f"CN {c.cn!r} is not the device id {want!r}: set [fleet] "
                              f"device_id = {c.cn!r} or re-provision")
        # pki's messages are "what: fix".
        for p in c.problems:
            what, _, fix = p.rpartition(": ")
            checks.append(Check("certificate", FAIL, what, fix))
        for w in c.warnings:
            what, _, fix = w.rpartition(": ")
            checks.append(Check("certificate", WARN, what, fix))
        if not c.problems:
            checks.append(Check("certificate", OK, f"CN {c.cn}, valid until "
                                f"{c.not_after:%Y-%m-%d}, chains to {f.ca_file}, key matches"))
    elif tls:
        checks.append(Check("certificate", FAIL, "mqtts without ca_file, cert_file, key_file",
                            "set them in [fleet] (edge-fleet provision writes them)"))
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        checks.append(Check("broker", FAIL, f"{host}:{port} unreachable: {e}",
                            "check the network, DNS and the broker's listener"))
        return checks
    try:
        sock: socket.socket = raw
        if tls:
            ctx = ssl.create_default_context(cafile=str(f.ca_file) if f.ca_file else None)
            if f.cert_file and f.key_file:
                ctx.load_cert_chain(str(f.cert_file), str(f.key_file))
            sock = ctx.wrap_socket(raw, server_hostname=host)
        sock.settimeout(timeout)
        code = _mqtt_connect(sock, f"{f.device_id or socket.gethostname()}-doctor-{os.getpid()}")
    except (OSError, ssl.SSLError) as e:
        checks.append(Check("broker", FAIL, f"{f.broker}: {e}",
                            "the broker refused the TLS session: check that the certificate "
                            "is this fleet's, not expired or revoked"))
        return checks
    finally:
        raw.close()
    if code != 0:
        checks.append(Check("broker", FAIL, f"{f.broker} refused CONNECT (reason {code:#x})",
                            "check the broker's ACL and that the certificate CN is the device id"))
    else:
        checks.append(Check("broker", OK, f"{f.broker}: TLS and MQTT CONNECT accepted"))
    return checks


def check_remote_config(cfg: Config, path: Path | None) -> Check:
    """The overlay serve merges over the config file: what it sets, or why serve ignores it
    (serve reads it the same way, fleet/remote_config.py)."""
    from edge_runtime.fleet.remote_config import (
        load_device_config,
        overlay_path,
        read_overlay,
        table_keys,
    )

    overlay = overlay_path(cfg.fleet) if cfg.fleet.enabled else None
    if overlay is None:
        return Check("remote config", SKIP, "the fleet agent is off: no overlay")
    if not overlay.exists() and not overlay.is_symlink():
        return Check("remote config", OK, f"no overlay at {overlay} (no set-config yet)")
    loaded = load_device_config(path, {})
    if loaded.ignored is not None:
        return Check("remote config", WARN, loaded.ignored,
                     f"send a whole-document set-config (edge-fleet set-config --device "
                     f"{cfg.fleet.device_id or 'ID'} --toml FILE) or delete {overlay}")
    keys = table_keys(read_overlay(overlay))
    return Check("remote config", OK, f"{overlay} merged: {', '.join(keys) or 'no keys'}")


def run_checks(cfg: Config) -> list[Check]:
    jetson = TEGRA_RELEASE.exists()
    state = cfg.fleet.root or Path("/var/lib/edge-runtime")
    return [
        check_release(jetson), check_cuda(jetson), check_tensorrt(jetson),
        check_providers(jetson), check_power(jetson), check_memory(), check_disk(state),
        *check_broker(cfg),
    ]  # fmt: skip


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)


def report(cfg: Config, path: Path | None) -> int:
    """Print every check; 1 if any failed."""
    from edge_runtime import __version__

    checks = [*run_checks(cfg), check_remote_config(cfg, path)]
    print(f"edge-runtime {__version__} doctor, config {path or '(defaults)'}")
    for c in checks:
        print(c.line())
    bad = failed(checks)
    print("some checks FAILED: fix them from the top" if bad else "no check failed")
    return 1 if bad else 0
