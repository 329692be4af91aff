"""One deploy on a device, step by step, with an ack at each step (used by agent.py).

    deployer.deploy(cmd)    [download] → verify → stage → switch → health check → commit,
                            or roll back to the previous bundle when the check fails
    deployer.rollback(cmd)  swap back to the previous bundle (`expect_active` guards it)

Every step is idempotent, so a deploy interrupted by kill -9 is simply run again after
`Slots.recover()`: a download resumes from its part file, a staged bundle is found staged,
an active and confirmed one is reported `already active`. `crash_point` names the places
where the kill -9 tests stop the process (scripts/deploy_crash_matrix.py).

Downgrades are refused: a deploy whose bundle's manifest `version` sorts below the active
bundle's (`version_key`) is rejected after verification and before anything switches, so a
replayed old deploy of a signed but older (vulnerable) bundle cannot go back in time. Going
back is the `rollback` command's job, itself signed, and it only swaps to the previous slot.
Version order (docs/FLEET.md): `N(.N)*` release numbers compared numerically (missing parts
are 0: 1.2 == 1.2.0), then a pre-release (`-rc1`, `a1`, anything after the numbers but
`+build`) before the release itself, pre-releases compared by their text; `+build` is
ignored. A version that does not start with a number sorts below every numbered one.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.errors import EdgeError, HealthCheckError
from edge_runtime.fleet import messages as fm
from edge_runtime.fleet.download import DownloadPolicy, download, part_path
from edge_runtime.fleet.slots import Slots, crash_point

log = logging.getLogger(__name__)

HealthCheck = Callable[[Path], "Mapping[str, Any] | None"]
"""Raises (any exception) when the bundle at the path must not serve; what it returns (the
probe's numbers, say) goes into the `active` ack as `detail.health`."""
_PROGRESS_EVERY_S = 5.0
"""At most one `downloading` ack per this many seconds."""
_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)(.*)")


def version_key(version: str) -> tuple[Any, ...]:
    """Sort key of a bundle version (see the module docstring)."""
    m = _VERSION.fullmatch(version.split("+", 1)[0].strip())
    if m is None:
        return (0,)
    release = [int(x) for x in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    pre = m.group(2).lstrip("-._")
    return (1, tuple(release), 0 if pre else 1, pre)


def manifest_version(bundle_dir: Path) -> str:
    from edge_runtime.bundle.manifest import MANIFEST

    return str(json.loads((bundle_dir / MANIFEST).read_text()).get("version", ""))


def default_health_check(trusted: list[Ed25519PublicKey]) -> HealthCheck:
    """Verify, load the generator and run a short greedy generation.

    A bundle whose build record holds `health_probe = {"prompt", "expected"}` must
    reproduce `expected` exactly (greedy decoding is deterministic); otherwise 4 tokens
    must come out.
    """

    def check(path: Path) -> None:
        from edge_runtime.bundle.manifest import verify_bundle
        from edge_runtime.model.generator import Generator
        from edge_runtime.model.sampling import SamplingParams

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


class Deployer:
    def __init__(
        self,
        device: str,
        slots: Slots,
        signers: set[str],
        health_check: HealthCheck,
        on_switch: Callable[[Path | None], None] | None,
        ack: Callable[[fm.Ack], None],
        policy: DownloadPolicy,
    ) -> None:
        self.device = device
        self.slots = slots
        self.signers = signers
        """Key ids of the trusted keys: a deploy's `signer` must be one of them."""
        self.health_check = health_check
        self.on_switch = on_switch
        self._ack = ack
        self.policy = policy

    def deploy(self, cmd: fm.Command) -> fm.Ack:
        p = fm.deploy_params(cmd)
        if p.signer not in self.signers:
            return self._reject(cmd.id, f"signer {p.signer} is not trusted on this device")
        src: str | Path = p.bundle
        if p.is_url:
            try:
                src = self._download(cmd, p)
            except (EdgeError, OSError) as e:
                return self._reject(cmd.id, f"download failed: {e}")
        self._ack(fm.Ack(cmd.id, self.device, "verifying"))
        try:
            version = self.slots.stage(src, p.sha256, p.signer)
        except (EdgeError, OSError) as e:
            return self._reject(cmd.id, f"refused before staging: {e}")
        finally:
            if p.is_url and self.slots.downloads.is_dir():
                self.slots.clean_downloads()  # extracted (or refused): the archive is done
        self._ack(fm.Ack(cmd.id, self.device, "staged", bundle=version))
        refusal = self._downgrade(version)
        if refusal is not None:
            self.slots.gc()  # the staged older bundle goes; active and previous stay
            return self._reject(cmd.id, refusal)
        if self.slots.active == version and self.slots.state()["confirmed"]:
            return fm.Ack(cmd.id, self.device, "active", "already active", bundle=version)
        try:
            self.slots.activate(version)
        except (EdgeError, OSError) as e:
            return self._reject(cmd.id, f"could not switch: {e}")
        self._switched()
        self._ack(fm.Ack(cmd.id, self.device, "checking", bundle=version))
        crash_point("agent:checking")
        try:
            verdict = self.health_check(self.slots.path(version))
        except Exception as e:
            reason = f"health check failed: {type(e).__name__}: {e}"
            try:
                now = self.slots.rollback()
            except EdgeError as e2:
                # No previous bundle: keep the new one rather than nothing at all.
                log.error("cannot roll back %s: %s", version, e2)
                self.slots.commit()
                return self._reject(cmd.id, f"{reason}; no previous bundle to roll back to")
            self._switched()
            return fm.Ack(cmd.id, self.device, "rolled_back", reason, bundle=now)
        self.slots.commit()
        self.slots.gc()
        detail = {"health": dict(verdict)} if isinstance(verdict, Mapping) else None
        return fm.Ack(cmd.id, self.device, "active", bundle=version, detail=detail)

    def _downgrade(self, version: str) -> str | None:
        active = self.slots.active
        if active is None or active == version:
            return None
        try:
            new = manifest_version(self.slots.path(version))
            cur = manifest_version(self.slots.path(active))
        except (OSError, ValueError) as e:
            return f"cannot compare bundle versions: {e}"
        if version_key(new) < version_key(cur):
            return (f"downgrade refused: bundle version {new!r} is older than the active "
                    f"{cur!r} ({active}); use a signed rollback to return to the previous "
                    "slot")
        return None

    def _download(self, cmd: fm.Command, p: fm.DeployParams) -> Path:
        part = part_path(self.slots.downloads, p.sha256)
        have = part.stat().st_size if part.exists() else 0
        self._ack(fm.Ack(cmd.id, self.device, "downloading",
                         detail={"bytes": have, "total": p.size}))
        last = [time.monotonic()]

        def progress(done: int, total: int | None) -> None:
            if time.monotonic() - last[0] >= _PROGRESS_EVERY_S:
                last[0] = time.monotonic()
                self._ack(fm.Ack(cmd.id, self.device, "downloading",
                                 detail={"bytes": done, "total": total}))

        path = download(
            p.bundle, self.slots.downloads, p.sha256, size=p.size or 0,
            free_bytes=lambda d: self.slots.free_bytes(),
            # Extracting needs the archive's size again, plus the slots' margin.
            reserve_bytes=lambda total: total + self.slots.margin_bytes,
            policy=self.policy, progress=progress,
            on_chunk=lambda n: crash_point("download:partial"),
        )
        crash_point("download:verified")
        return path

    def rollback(self, cmd: fm.Command) -> fm.Ack:
        expect = fm.rollback_params(cmd)
        if expect is not None and expect != self.slots.active:
            # A rollout's rollback must not undo a bundle it never installed.
            return fm.Ack(cmd.id, self.device, "rejected", f"active bundle is "
                          f"{self.slots.active}, not {expect}: nothing to roll back",
                          bundle=self.slots.active)
        try:
            now = self.slots.rollback()
        except EdgeError as e:
            return self._reject(cmd.id, str(e))
        self._switched()
        return fm.Ack(cmd.id, self.device, "rolled_back", bundle=now)

    def _reject(self, cid: str, reason: str) -> fm.Ack:
        return fm.Ack(cid, self.device, "rejected", reason)

    def _switched(self) -> None:
        if self.on_switch is not None:
            self.on_switch(self.slots.active_path())
