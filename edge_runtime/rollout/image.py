"""`edge-fleet image`: a device's root-file-system overlay for NVIDIA's L4T flashing tools.

    OVERLAY/etc/edge-runtime/...            the provisioned identity and config (provision.py)
    OVERLAY/etc/systemd/system/edge-runtime{,-install}.service  (+ multi-user.target.wants)
    OVERLAY/usr/lib/sysusers.d/edge-runtime.conf   the daemon's user (made at boot)
    OVERLAY/usr/lib/tmpfiles.d/edge-runtime.conf   owners naming that user (set at boot)
    OVERLAY/opt/edge-runtime/wheels/*.whl   the runtime (and --wheelhouse: its dependencies,
                                            onnxruntime-gpu from NVIDIA's Jetson index)
    OVERLAY/opt/edge-runtime/libexec/       first-boot venv install, engine-build pre-start
    OVERLAY/opt/edge-runtime/first-bundle/  the first bundle, served until a deploy

scripts/flash_orin.sh copies it into Linux_for_Tegra/rootfs and flashes. Every file is owned
by root here (the daemon's user exists only on the device); check_overlay is the dry run's
verdict: units that pass `systemd-analyze verify`, a bundle that verifies against the
shipped trust store, a certificate that chains to the CA and matches its key, modes, owners,
and a unit that lets the daemon write its fleet root and remote-config overlay
(/var/lib/edge-runtime/remote.toml) but not /etc/edge-runtime/config.toml.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edge_runtime import pki
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.config import load_config
from edge_runtime.errors import ConfigError, EdgeError
from edge_runtime.fleet.remote_config import overlay_path
from edge_runtime.signing import load_public_key

UNITS = ("edge-runtime.service", "edge-runtime-install.service")
SCRIPTS = ("edge-runtime-install", "edge-runtime-prestart")
OPT = Path("opt/edge-runtime")
ETC = Path("etc/edge-runtime")
# (path in the overlay, mode); owners are root:root in the overlay, tmpfiles.d sets the rest.
MODES = {
    ETC: 0o750, ETC / "config.toml": 0o640, ETC / "tls": 0o750, ETC / "tls/device.key": 0o600,
    ETC / "tls/device.pem": 0o644, ETC / "tls/ca.pem": 0o644,
    Path("etc/systemd/system/edge-runtime.service"): 0o644,
    Path("usr/lib/sysusers.d/edge-runtime.conf"): 0o644,
    Path("usr/lib/tmpfiles.d/edge-runtime.conf"): 0o644,
    OPT / "libexec/edge-runtime-install": 0o755, OPT / "libexec/edge-runtime-prestart": 0o755,
}  # fmt: skip


def deploy_dir() -> Path:
    """deploy/systemd of the source tree (the overlay is built from a checkout)."""
    d = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
    if not d.is_dir():
        raise ConfigError(f"{d} is missing: build the overlay from a source checkout")
    return d


def _copy(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)


def build_overlay(out: Path, device_etc: Path, bundle: Path, wheels: list[Path],
                  units: Path | None = None) -> Path:
    """The overlay for one provisioned device (device_etc: provision's etc/edge-runtime)."""
    units = units or deploy_dir()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(device_etc, out / ETC)  # copytree keeps the modes provision set
    os.chmod(out / ETC, 0o750)
    os.chmod(out / ETC / "tls", 0o750)
    system = out / "etc/systemd/system"
    for unit in UNITS:
        _copy(units / unit, system / unit, 0o644)
        wants = system / "multi-user.target.wants" / unit
        wants.parent.mkdir(parents=True, exist_ok=True)
        wants.symlink_to(f"../{unit}")  # `systemctl enable`, done offline
    for script in SCRIPTS:
        _copy(units / script, out / OPT / "libexec" / script, 0o755)
    _copy(units / "edge-runtime.sysusers", out / "usr/lib/sysusers.d/edge-runtime.conf", 0o644)
    _copy(units / "edge-runtime.tmpfiles", out / "usr/lib/tmpfiles.d/edge-runtime.conf", 0o644)
    for wheel in wheels:
        _copy(wheel, out / OPT / "wheels" / wheel.name, 0o644)
    shutil.copytree(bundle, out / OPT / "first-bundle")
    if os.geteuid() == 0:  # a flash host runs as root: make ownership explicit
        for p in [out, *out.rglob("*")]:
            os.lchown(p, 0, 0)
    return out


def _systemd_verify(overlay: Path) -> list[str]:
    """`systemd-analyze verify --root` on the units, in a scratch root holding the overlay's
    units and scripts, the host's stock units (sysinit.target, …) and a stand-in for the
    venv's executable, which the device makes on first boot. Any output is a failure."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return ["systemd-analyze is not installed: apt-get install -y systemd"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(overlay / "etc/systemd/system", root / "etc/systemd/system",
                        symlinks=True)
        shutil.copytree(overlay / OPT / "libexec", root / OPT / "libexec")
        stock = Path("/usr/lib/systemd/system")
        if stock.is_dir():
            shutil.copytree(stock, root / "usr/lib/systemd/system", symlinks=True)
        venv_exe = root / OPT / "venv/bin/edge-runtime"
        venv_exe.parent.mkdir(parents=True)
        venv_exe.write_text("#!/bin/sh\n")
        venv_exe.chmod(0o755)
        proc = subprocess.run(
            [exe, "verify", f"--root={root}", *(f"/etc/systemd/system/{u}" for u in UNITS)],
            capture_output=True, text=True, timeout=60, check=False,
        )
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 or text:
        return [f"systemd-analyze verify: {line}" for line in text.splitlines()] or [
            f"systemd-analyze verify exited {proc.returncode}"]
    return []


def _writable_paths(overlay: Path, root: Path | None, remote: Path | None) -> list[str]:
    """Under the unit's ProtectSystem=strict the daemon writes only its ReadWritePaths and
    StateDirectory: the fleet root (slots, journal) and the remote-config overlay must lie
    there, and the provisioned config must not (set-config would then rewrite it)."""
    text = (overlay / "etc/systemd/system/edge-runtime.service").read_text()
    writable = [Path(p.lstrip("-")) for line in
                re.findall(r"^ReadWritePaths=(.+)$", text, re.M) for p in line.split()]
    writable += [Path("/var/lib") / d for line in
                 re.findall(r"^StateDirectory=(.+)$", text, re.M) for d in line.split()]

    def inside(p: Path) -> bool:
        return any(p == w or w in p.parents for w in writable)

    problems = [f"unit: {name} {p} is not writable under ProtectSystem=strict (ReadWritePaths "
                f"or StateDirectory of edge-runtime.service: {', '.join(map(str, writable))})"
                for name, p in (("fleet.root", root), ("fleet.remote_config", remote))
                if p is not None and not inside(p)]
    if inside(Path("/") / ETC / "config.toml"):
        problems.append(f"unit: /{ETC}/config.toml is writable by the daemon; it must be "
                        "read-only (remote changes go to fleet.remote_config)")
    return problems


def check_overlay(overlay: Path) -> list[str]:
    """Everything wrong with an overlay, one line each (empty: ready to flash)."""
    problems = _systemd_verify(overlay)
    etc = overlay / ETC
    try:
        cfg = load_config(etc / "config.toml")
    except EdgeError as e:
        return [*problems, f"config: {e}"]
    # The config names device paths (/etc/edge-runtime/...): read them inside the overlay.
    def here(p: Path | None) -> Path:
        assert p is not None
        return overlay / p.relative_to("/")

    f = cfg.fleet
    if None in (f.ca_file, f.cert_file, f.key_file, f.device_id):
        problems.append("config: [fleet] needs ca_file, cert_file, key_file and device_id")
        return problems
    try:
        c = pki.check_device_cert(here(f.cert_file), here(f.key_file), here(f.ca_file))
        problems += [f"certificate: {p}" for p in c.problems]
        if c.cn != f.device_id:
            problems.append(f"certificate: CN {c.cn!r} is not the device id {f.device_id!r}")
    except EdgeError as e:
        problems.append(f"certificate: {e}")
    try:
        keys = [load_public_key(here(p)) for p in f.pubkeys or cfg.model.pubkeys]
        if not keys:
            problems.append("trust store: no bundle-signer key in the config")
        else:
            verify_bundle(overlay / OPT / "first-bundle", keys)
    except EdgeError as e:
        problems.append(f"first bundle: {e}")
    for rel, mode in MODES.items():
        p = overlay / rel
        if not p.exists():
            problems.append(f"{rel}: missing")
            continue
        st = p.lstat()
        if st.st_mode & 0o7777 != mode:
            problems.append(f"{rel}: mode {st.st_mode & 0o7777:04o}, want {mode:04o}")
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
            problems.append(f"{rel}: owner {st.st_uid}:{st.st_gid}, want 0:0 (root)")
    problems += _writable_paths(overlay, cfg.fleet.root, overlay_path(cfg.fleet))
    tmpfiles = (overlay / "usr/lib/tmpfiles.d/edge-runtime.conf").read_text()
    for need in ("/etc/edge-runtime/tls/device.key 0600 edge-runtime",
                 "/etc/edge-runtime/config.toml 0640 root edge-runtime"):
        if need not in tmpfiles:
            problems.append(f"tmpfiles.d: no line setting {need}")
    if not list((overlay / OPT / "wheels").glob("edge_runtime-*.whl")):
        problems.append("wheels: no edge_runtime wheel")
    return problems


def build_wheel(dest: Path) -> Path:
    """The runtime's wheel, built from this checkout (pip wheel --no-deps)."""
    src = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src),
                           "-w", str(dest)], capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("edge_runtime-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ConfigError(f"cannot build the runtime's wheel from {src}: {last}: pass --wheel")
    return wheels[-1]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`edge-fleet image` (rollout/cli.py registers it with this one call)."""
    p = sub.add_parser("image", help="build and check provisioned devices' rootfs overlays")
    p.add_argument("--provisioned", type=Path, required=True,
                   help="edge-fleet provision's --out directory")
    p.add_argument("--device", action="append", default=[],
                   help="device id (repeatable; default: every provisioned device)")
    p.add_argument("--bundle", type=Path, required=True, help="the first bundle to serve")
    p.add_argument("--wheel", action="append", type=Path, default=[],
                   help="runtime wheel (default: built from this checkout)")
    p.add_argument("--wheelhouse", type=Path,
                   help="directory of dependency wheels for the device (aarch64, cp310; "
                   "onnxruntime-gpu from NVIDIA's Jetson index): README § Jetson")
    p.add_argument("--out", type=Path, required=True, help="overlays go to OUT/DEVICE")
    p.set_defaults(fn=cmd_image)


def cmd_image(a: argparse.Namespace) -> int:
    devices_dir = a.provisioned / "devices"
    ids = list(a.device)
    if not ids and devices_dir.is_dir():
        ids = sorted(d.name for d in devices_dir.iterdir())
    if not ids:
        raise ConfigError(f"no provisioned devices in {devices_dir}: run edge-fleet provision")
    with tempfile.TemporaryDirectory() as tmp:
        wheels = list(a.wheel) or [build_wheel(Path(tmp))]
        if a.wheelhouse is not None:
            wheels += sorted(a.wheelhouse.glob("*.whl"))
        bad = 0
        for device in ids:
            etc = devices_dir / device / ETC
            if not etc.is_dir():
                raise ConfigError(f"{device} is not provisioned in {a.provisioned}")
            overlay = build_overlay(a.out / device, etc, a.bundle, wheels)
            problems = check_overlay(overlay)
            for line in problems:
                print(f"{device}: FAIL {line}")
            print(f"{device}: {'FAILED' if problems else 'OK'} overlay {overlay}")
            bad += bool(problems)
    return 1 if bad else 0
