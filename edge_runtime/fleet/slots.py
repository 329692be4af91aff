"""On-disk bundle slots of a device, with crash-safe switching.

    root/
      bundles/<version-id>/     complete, verified bundles (the id: name-version-manifest hash)
      bundles/.staging-*/       a bundle being copied in; invisible until renamed (recover
                                deletes leftovers)
      bundles/.trash-*/         a bundle being deleted (renamed first, so no half-deleted
                                bundle ever sits under a version id)
      state.json                {"active": id, "previous": id|null, "confirmed": bool}
      downloads/<sha256>.part   a bundle archive being downloaded (kept across restarts so
                                the download resumes; download.py); `.tar` once checked

Every switch is one rename of `state.json` after fsync (atomic.py's recipe), so a `kill -9`
at any instant leaves the old pointer or the new one. `activate` writes `confirmed: false`
and `commit` flips it once the health check passed: if the process dies in between,
`recover` goes back to `previous`, because nothing ever vouched for the new bundle (the
A/B-update rule of Mender and RAUC). `stage` verifies signature and hashes before anything
lands under `bundles/<id>`, and again on the copy, so a bundle tampered with in transit or
on the way in is refused with `active` untouched.

`EDGE_FLEET_CRASH_AT=<step>` makes the process print `PAUSED <step>` and sleep at that step:
the kill -9 tests SIGKILL it there. It costs one dict lookup per step in production.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import signing
from edge_runtime.atomic import atomic_write_bytes, fsync_dir
from edge_runtime.bundle.manifest import MANIFEST, Bundle, sha256_file, verify_bundle
from edge_runtime.errors import BundleError, DeployError, DiskSpaceError

STATE = "state.json"
BUNDLES = "bundles"
DOWNLOADS = "downloads"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
DEFAULT_MARGIN_BYTES = 64 << 20
"""Free space left after staging: logs, the engine cache and the OS need room too."""
_CRASH_ENV = "EDGE_FLEET_CRASH_AT"


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


def crash_point(step: str) -> None:
    """Test hook: pause forever at `step` when EDGE_FLEET_CRASH_AT names it."""
    if os.environ.get(_CRASH_ENV) == step:
        print(f"PAUSED {step}", flush=True)
        while True:
            time.sleep(3600)


class Slots:
    def __init__(
        self,
        root: str | os.PathLike[str],
        trusted: list[Ed25519PublicKey],
        margin_bytes: int = DEFAULT_MARGIN_BYTES,
        disk_usage: Callable[[Path], DiskUsage] | None = None,
    ) -> None:
        self.root = Path(root)
        self.bundles = self.root / BUNDLES
        self.trusted = list(trusted)
        self.margin_bytes = margin_bytes
        # Injectable so a test can simulate a full disk without filling one.
        self._disk_usage = disk_usage or (lambda p: DiskUsage(*shutil.disk_usage(p)))
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.downloads = self.root / DOWNLOADS

    def free_bytes(self) -> int:
        """Free space where bundles are staged (downloads share the filesystem)."""
        return self._disk_usage(self.bundles).free

    def clean_downloads(self, keep: Collection[str] = ()) -> list[str]:
        """Delete downloaded archives and parts whose SHA-256 is not in `keep`."""
        removed = []
        if self.downloads.is_dir():
            for p in sorted(self.downloads.iterdir()):
                if p.name.split(".", 1)[0] not in keep:
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return removed

    # -- state --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        try:
            raw = json.loads((self.root / STATE).read_text())
        except FileNotFoundError:
            return {"active": None, "previous": None, "confirmed": True}
        except (OSError, ValueError) as e:
            # Cannot happen through our own atomic writes; a hand edit or bad disk can.
            raise DeployError(f"{self.root / STATE} is unreadable: {e}") from e
        return {
            "active": raw.get("active"),
            "previous": raw.get("previous"),
            "confirmed": bool(raw.get("confirmed", True)),
        }

    @property
    def active(self) -> str | None:
        return self.state()["active"]

    @property
    def previous(self) -> str | None:
        return self.state()["previous"]

    def path(self, version: str) -> Path:
        return self.bundles / version

    def active_path(self) -> Path | None:
        a = self.active
        return self.path(a) if a else None

    def _write_state(self, state: dict[str, Any], step: str) -> None:
        data = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        atomic_write_bytes(self.root / STATE, data, before_rename=lambda: crash_point(
            f"{step}:tmp"))
        crash_point(f"{step}:done")

    # -- staging ------------------------------------------------------------------------

    def stage(
        self,
        src: str | os.PathLike[str],
        expected_sha256: str | None = None,
        expected_signer: str | None = None,
    ) -> str:
        """Verify `src` (bundle directory or .tar) and copy it into a slot; return its id.

        `expected_sha256` is the SHA-256 of the .tar file, or of `manifest.json` for a
        directory (the signed manifest pins every other file's hash). `expected_signer` is
        a key id: only that trusted key may have signed the bundle.
        """
        src = Path(src)
        trusted = self._keys_for(expected_signer)
        if not src.exists():
            raise DeployError(f"bundle source {src} does not exist")
        if src.is_dir():
            if expected_sha256 is not None:
                _check_sha(src / MANIFEST, expected_sha256)
            # Verify where it lies first: a bad bundle costs no copy and no disk space.
            bundle = verify_bundle(src, trusted)
            size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        else:
            if expected_sha256 is not None:
                _check_sha(src, expected_sha256)
            bundle = None
            size = _tar_size(src)
        crash_point("stage:verified")
        usage = self._disk_usage(self.bundles)
        if usage.free < size + self.margin_bytes:
            raise DiskSpaceError(
                f"staging needs {size + self.margin_bytes} bytes free ({size} for the bundle "
                f"+ {self.margin_bytes} margin), {usage.free} available in {self.bundles}"
            )
        tmp = Path(tempfile.mkdtemp(dir=self.bundles, prefix=STAGING_PREFIX))
        try:
            if bundle is not None:
                _copy_tree(src, tmp)
            else:
                _extract_tar(src, tmp)
            crash_point("stage:copied")
            # Verify the copy, not only the source: it is what will be served.
            staged = verify_bundle(tmp, trusted)
            if bundle is not None and staged.manifest != bundle.manifest:
                raise DeployError(f"bundle {src} changed while it was being copied")
            version = version_id(staged)
            dst = self.path(version)
            if dst.exists():
                verify_bundle(dst, trusted)  # already staged (a re-delivered deploy)
                shutil.rmtree(tmp)
                return version
            os.replace(tmp, dst)
            fsync_dir(self.bundles)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        crash_point("stage:renamed")
        return version

    def _keys_for(self, signer: str | None) -> list[Ed25519PublicKey]:
        if signer is None:
            return self.trusted
        keys = [k for k in self.trusted if signing.key_id(k) == signer]
        if not keys:
            raise DeployError(f"signer {signer!r} is not a trusted key on this device")
        return keys

    # -- switching ----------------------------------------------------------------------

    def activate(self, version: str) -> None:
        """Point `active` at a staged bundle (unconfirmed until `commit`)."""
        verify_bundle(self._existing(version), self.trusted)
        st = self.state()
        if st["active"] == version:
            return
        self._write_state({"active": version, "previous": st["active"], "confirmed": False},
                          "activate")

    def commit(self) -> None:
        """The active bundle passed its health check: keep it across restarts."""
        st = self.state()
        if st["active"] is not None and not st["confirmed"]:
            self._write_state({**st, "confirmed": True}, "commit")

    def rollback(self) -> str:
        """Swap `active` and `previous`; return the bundle now active."""
        st = self.state()
        prev = st["previous"]
        if prev is None:
            raise DeployError("no previous bundle to roll back to")
        verify_bundle(self._existing(prev), self.trusted)
        # Confirmed: the previous bundle was serving before, nothing to prove again.
        self._write_state({"active": prev, "previous": st["active"], "confirmed": True},
                          "rollback")
        return str(prev)

    def recover(self) -> str | None:
        """On start-up: drop leftovers, make `active` a complete, verified, vouched-for bundle.

        Returns the active id (None when no usable bundle exists).
        """
        for d in self.bundles.iterdir():
            if d.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(d, ignore_errors=True)
        for f in self.root.glob(f".{STATE}.*.tmp"):
            f.unlink(missing_ok=True)
        st = self.state()
        active, prev = st["active"], st["previous"]
        active_ok = active is not None and self._verifies(active)
        prev_ok = prev is not None and self._verifies(prev)
        if active_ok and (st["confirmed"] or not prev_ok):
            return str(active)
        if prev_ok:
            # Either the active bundle is broken or its health check never finished.
            self._write_state({"active": prev, "previous": active if active_ok else None,
                               "confirmed": True}, "recover")
            return str(prev)
        if active is not None and not active_ok:
            self._write_state({"active": None, "previous": None, "confirmed": True}, "recover")
        return None

    def gc(self) -> list[str]:
        """Delete bundles that are neither active nor previous; return their ids."""
        st = self.state()
        keep = {st["active"], st["previous"]}
        removed = []
        for d in sorted(self.bundles.iterdir()):
            if d.name.startswith(".") or d.name in keep:
                continue
            trash = self.bundles / f"{TRASH_PREFIX}{d.name}"
            os.replace(d, trash)  # one rename: never a half-deleted bundle under its id
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(d.name)
        fsync_dir(self.bundles)
        return removed

    def _existing(self, version: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", version) or version.startswith("."):
            raise DeployError(f"{version!r} is not a bundle version id")
        p = self.path(version)
        if not p.is_dir():
            raise DeployError(f"bundle {version} is not staged on this device")
        return p

    def _verifies(self, version: str) -> bool:
        try:
            verify_bundle(self._existing(version), self.trusted)
        except (BundleError, DeployError):
            return False
        return True


def version_id(bundle: Bundle) -> str:
    """`name-version-<12 hex of the manifest hash>`: two builds of one version differ."""
    digest = sha256_file(bundle.root / MANIFEST)[:12]
    raw = f"{bundle.manifest.name}-{bundle.manifest.version}"
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', raw).lstrip('.')}-{digest}"


def _check_sha(path: Path, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected.lower():
        raise BundleError(
            f"{path.name}: SHA-256 {digest[:16]}… does not match the expected {expected[:16]}…"
        )


def _copy_tree(src: Path, dst: Path) -> None:
    for i, p in enumerate(sorted(src.rglob("*"))):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())  # durable before the rename that makes it visible
        if i == 0:
            crash_point("stage:copying")
    for d in sorted({p for p in dst.rglob("*") if p.is_dir()} | {dst},
                    key=lambda p: -len(p.parts)):
        fsync_dir(d)


def _tar_size(src: Path) -> int:
    try:
        with tarfile.open(src) as tf:
            return sum(m.size for m in tf.getmembers() if m.isfile())
    except (OSError, tarfile.TarError) as e:
        raise BundleError(f"{src} is not a readable tar archive: {e}") from e


def _extract_tar(src: Path, dst: Path) -> None:
    """Extract regular files and directories only; refuse links and paths that escape."""
    with tarfile.open(src) as tf:
        members = tf.getmembers()
        # A tar made of a bundle directory may hold it under one top-level folder.
        tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
        strip = len(tops) == 1 and not any(
            m.isfile() and len(Path(m.name).parts) == 1 for m in members
        )
        for m in members:
            parts = Path(m.name).parts[1 if strip else 0:]
            if not parts:
                continue
            if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                raise BundleError(f"{src}: refusing tar member {m.name!r}")
            target = dst.joinpath(*parts)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            f = tf.extractfile(m)
            assert f is not None
            with f, open(target, "wb") as out:
                shutil.copyfileobj(f, out)
                out.flush()
                os.fsync(out.fileno())
            crash_point("stage:copying")  # some files out, others not yet
    for d in sorted({p for p in dst.rglob("*") if p.is_dir()} | {dst},
                    key=lambda p: -len(p.parts)):
        fsync_dir(d)


if __name__ == "__main__":  # pragma: no cover - used by the kill -9 tests
    # python -m edge_runtime.fleet.slots ROOT PUBKEY SRC: stage, activate, commit.
    from edge_runtime.signing import load_public_key

    slots = Slots(sys.argv[1], [load_public_key(Path(sys.argv[2]))], margin_bytes=0)
    v = slots.stage(sys.argv[3])
    slots.activate(v)
    crash_point("health")
    slots.commit()
    print("DONE", v, flush=True)
