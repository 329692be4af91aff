"""The device agent as a process of its own, beside a daemon (or with none, for tests).

    python -m edge_runtime.fleet.agent_process --root DIR --device D --broker URL --pubkey PEM
        --operator-key PEM|DIR [--operator-key ...]
        [--group G ...] [--config FILE.toml [--remote-config OVERLAY.toml]]
        [--health verify|generate]
        [--ca CA.pem --cert CLIENT.pem --key CLIENT.key] [--download-ca CA.pem]
        [--telemetry-s 30]

Runs until SIGTERM / SIGINT. `--health verify` vouches for a bundle by its signature and
hashes alone (a device without the model's runtime, or the kill -9 matrix of
scripts/deploy_crash_matrix.py, whose bundles hold no real model); `generate` (default)
also loads it and generates a few tokens. Prints `READY` once connected and subscribed.
With `--config` (read, never written), set-config writes its overlay: `--remote-config`,
else `ROOT/remote.toml`; without it, set-config is refused.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.errors import EdgeError
from edge_runtime.fleet.agent import AgentConfig, DeviceAgent, default_health_check
from edge_runtime.fleet.download import DownloadPolicy
from edge_runtime.fleet.remote_config import REMOTE_FILE
from edge_runtime.mqtt.client import TlsFiles
from edge_runtime.signing import load_public_key, load_public_keys


def _verify_only(path: Path, trusted: list[Ed25519PublicKey]) -> None:
    verify_bundle(path, trusted)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_runtime.fleet.agent_process")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--broker", required=True)
    ap.add_argument("--pubkey", type=Path, action="append", required=True)
    ap.add_argument("--operator-key", type=Path, action="append", default=[],
                    help="operator public key (PEM) or directory of *.pub whose signed "
                    "commands run here (none: every command is refused)")
    ap.add_argument("--group", action="append", default=[])
    ap.add_argument("--config", type=Path, help="the provisioned config (read only)")
    ap.add_argument("--remote-config", type=Path,
                    help="the overlay set-config writes (default: ROOT/remote.toml)")
    ap.add_argument("--health", choices=("verify", "generate"), default="generate")
    ap.add_argument("--ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--download-ca", help="CA bundle for https bundle URLs (default: system)")
    ap.add_argument("--telemetry-s", type=float, default=30.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        trusted = [load_public_key(p) for p in args.pubkey]
        tls = TlsFiles(args.ca, args.cert, args.key) if args.ca or args.cert else None
        cfg = AgentConfig(args.device, args.broker, args.root, groups=tuple(args.group),
                          telemetry_interval_s=args.telemetry_s, tls=tls,
                          reconnect_min_s=0.2, reconnect_max_s=2.0, config_path=args.config,
                          remote_config=((args.remote_config or args.root / REMOTE_FILE)
                                         if args.config else None),
                          download=DownloadPolicy(ca_file=args.download_ca))
        check = (default_health_check(trusted) if args.health == "generate"
                 else lambda p: _verify_only(p, trusted))
        agent = DeviceAgent(cfg, trusted, health_check=check,
                            operators=load_public_keys(args.operator_key))
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    agent.start()
    while not done.is_set() and not agent.mqtt.wait_subscribed(0.5):
        pass
    print("READY", flush=True)
    done.wait()
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
