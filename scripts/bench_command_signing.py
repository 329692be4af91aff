"""What operator-signed fleet commands cost: sign and verify per command, and the share of
fleet_sim's smallest smoke run (the one tests/rollout/test_fleet_sim.py runs) they take.

    python scripts/bench_command_signing.py [--n 2000] [--no-sim]

Sign: `CommandSigner.sign` (canonical JSON + ed25519), as edge-fleet and the rollout driver
do per command sent. Verify: JSON decode + `CommandVerifier.check` (canonical JSON, ed25519
verify, target and expiry) + the command's parse, as an agent does per command received;
the nonce goes into the journal write the agent made before signing existed (same fsync).
The smoke run's share is (sign + verify) x the commands its operator audit log recorded,
over its wall time. Prints a Markdown table (docs/FLEET.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from edge_runtime.fleet import messages as fm  # noqa: E402
from edge_runtime.fleet.audit import read_audit  # noqa: E402
from edge_runtime.fleet.command_auth import (  # noqa: E402
    CommandSigner,
    CommandVerifier,
    device_target,
)
from edge_runtime.mqtt import topics  # noqa: E402

COMMANDS = {
    "drain": fm.Command("r1.drain.dev-00001", "drain"),
    "deploy": fm.Command("r1.deploy.dev-00001", "deploy", {
        "bundle": "https://bundles.example/demo-2.tar", "sha256": "ab" * 32,
        "signer": "0123456789abcdef", "size": 123_456_789}),
}


def per_command_us(n: int) -> dict[str, tuple[float, float]]:
    signer = CommandSigner(Ed25519PrivateKey.generate())
    verifier = CommandVerifier("dev-00001", ("sim",), [signer.key.public_key()])
    topic = topics.fleet_cmd("dev-00001")
    out: dict[str, tuple[float, float]] = {}
    for name, cmd in COMMANDS.items():
        t0 = time.perf_counter()
        payloads = [signer.sign(cmd, device_target("dev-00001")) for _ in range(n)]
        sign_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for p in payloads:
            doc = fm.decode_command(p)
            verifier.check(doc, topic)
            fm.command_from_dict(doc)
        verify_us = (time.perf_counter() - t0) / n * 1e6
        out[name] = (sign_us, verify_us)
    return out


def smoke_run() -> tuple[float, int]:
    """(wall seconds, commands sent) of fleet_sim's smallest smoke run."""
    with tempfile.TemporaryDirectory(prefix="sign-bench-") as tmp:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "fleet_sim.py"), "--devices", "10",
             "--procs", "2", "--soak", "0.5", "--ack-timeout", "3", "--telemetry-interval",
             "0.3", "--offline-share", "0.3", "--probe-fail-share", "0.15",
             "--max-failures", "60%", "--workdir", tmp, "--no-write"],
            capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])})
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"fleet_sim failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        sent = sum(1 for r in read_audit(Path(tmp) / "audit.jsonl")
                   if r.get("event") == "command-sent")
    return wall, sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--no-sim", action="store_true")
    a = ap.parse_args()
    costs = per_command_us(a.n)
    print("| command | sign (µs) | verify + parse (µs) |")
    print("|---|---:|---:|")
    for name, (s, v) in costs.items():
        print(f"| {name} | {s:.0f} | {v:.0f} |")
    if not a.no_sim:
        wall, sent = smoke_run()
        s, v = costs["deploy"]
        share = sent * (s + v) / 1e6 / wall
        print(f"\nfleet_sim smoke run (10 devices): {wall:.1f} s wall, {sent} signed commands, "
              f"signing + verifying ≈ {sent * (s + v) / 1e3:.1f} ms = {share:.3%} of the run")
    print(json.dumps({k: {"sign_us": round(x, 1), "verify_us": round(y, 1)}
                      for k, (x, y) in costs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
