"""`edge-runtime`: serve a bundle over the OpenAI-compatible API, or verify one.

    edge-runtime serve  [--bundle DIR] [--pubkey PEM ...] [--host H] [--port P]
                        [--config FILE] [--threads N] [--api-key-file FILE] [--backend B]
                        [--tls-cert PEM --tls-key PEM] [--docs]
                        [--fleet --fleet-broker URL --fleet-root DIR [--device-id ID]
                         [--group G ...]]   (no --config: FLEET_ROOT/config.toml if any)
    edge-runtime verify BUNDLE [--pubkey PEM ...]
    edge-runtime build-engine BUNDLE [--pubkey PEM ...] [--profile max_batch=N,max_context=N]
                        [--precision auto|fp16|fp32|strongly-typed] [--config FILE]
                        [--cache-dir DIR] [--opt-level 0-5] [--workspace-mb N] [--force]
    edge-runtime doctor [--config FILE]   (exit 1 if a check failed)
    edge-runtime cloud-worker --bundle DIR [--pubkey PEM ...] --broker mqtt://HOST:PORT
                        [--group G] [--concurrency N] [--threads N] [--echo]
                        [--chunk-tokens 8] [--chunk-ms 25] [--prefill-chunk 128]
                        [--username U --password-file F] [--ca-file F --cert-file F
                         --key-file F]   (or $EDGE_CLOUD_USERNAME, $EDGE_CLOUD_PASSWORD, …)

User errors (a bad bundle, a bad config, a missing key) print one line and exit 1; only
bugs print tracebacks. Exit code 2 is argparse's, for a malformed command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import __version__, sdnotify
from edge_runtime.bundle.manifest import Bundle, verify_bundle
from edge_runtime.cloud.coalesce import ChunkPolicy
from edge_runtime.config import API_KEY_ENV, LOG_LEVELS, Config, load_config
from edge_runtime.errors import ConfigError, EdgeError, SignatureError
from edge_runtime.mqtt.auth import add_auth_options, auth_from_args
from edge_runtime.signing import default_trust_dir, trusted_keys

if TYPE_CHECKING:
    import uvicorn

    from edge_runtime.offload.client import OffloadClient
    from edge_runtime.serving.engine_loop import LocalWorker

log = logging.getLogger("edge_runtime")
DEVICE_CONFIG = Path("/etc/edge-runtime/config.toml")  # where provisioning puts it


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except EdgeError as e:
        print(f"edge-runtime: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # an optional package this install lacks
        from edge_build.extras import missing_module_hint

        print(f"edge-runtime: error: {missing_module_hint(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-runtime", description="Serve or verify an edge model bundle."
    )
    p.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pubkey = {
        "action": "extend",
        "nargs": "+",
        "type": Path,
        "metavar": "PEM",
        "help": "trusted ed25519 public key (repeatable); default: *.pub in the trust dir",
    }

    serve = sub.add_parser("serve", help="serve a bundle over the OpenAI-compatible HTTP API")
    serve.add_argument("--bundle", type=Path, help="bundle directory (default: the demo bundle)")
    serve.add_argument("--pubkey", **pubkey)  # type: ignore[arg-type]
    serve.add_argument("--config", type=Path, help="TOML config file; flags override its keys")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000; 0 = any free port)")
    serve.add_argument("--threads", type=int, help="CPU engine threads (default: automatic)")
    serve.add_argument("--backend", help="engine backend (default: auto)")
    serve.add_argument("--api-key", help="deprecated (visible in ps): --api-key-file or "
                       f"${API_KEY_ENV}")
    serve.add_argument("--api-key-file", type=Path,
                       help="require 'Authorization: Bearer KEY' on /v1 and /metrics, KEY "
                       f"being this file's first line (or set ${API_KEY_ENV})")
    serve.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate")
    serve.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    serve.add_argument("--docs", action="store_true", default=None,
                       help="serve /docs and /openapi.json (off by default)")
    serve.add_argument("--access-log", help="JSON-lines access log: path, '-' = stdout, '' = off")
    serve.add_argument("--log-level", choices=LOG_LEVELS)
    fleet = serve.add_argument_group(
        "fleet", "run the device agent in the daemon ([fleet] in the config file): serve the "
        "active bundle slot (on first boot, --bundle becomes it) and hot-swap on deploys")
    fleet.add_argument("--fleet", action="store_true", default=None, help="enable the agent")
    fleet.add_argument("--fleet-broker", help="mqtt://host:port of the fleet broker")
    fleet.add_argument("--fleet-root", type=Path, help="device directory: slots, journal")
    fleet.add_argument("--device-id", help="device id (default: the host name)")
    fleet.add_argument("--group", action="append", help="device group (repeatable)")
    serve.set_defaults(func=_serve)

    verify = sub.add_parser("verify", help="check a bundle's signature and file hashes")
    verify.add_argument("bundle", type=Path, metavar="BUNDLE")
    verify.add_argument("--pubkey", **pubkey)  # type: ignore[arg-type]
    verify.set_defaults(func=_verify)

    build = sub.add_parser(
        "build-engine", help="build the bundle's TensorRT plan for this GPU (docs/TENSORRT.md)"
    )
    build.add_argument("bundle", type=Path, metavar="BUNDLE")
    build.add_argument("--pubkey", **pubkey)  # type: ignore[arg-type]
    build.add_argument("--profile", default="",
                       help="max_batch=N,max_context=N[,opt_batch=N,opt_context=N] (default: "
                       "scheduler.max_batch of --config, else 16; the bundle's context length)")
    build.add_argument("--precision", default="auto",
                       choices=("auto", "fp16", "fp32", "strongly-typed"))
    build.add_argument("--config", type=Path, help="TOML config: its scheduler.max_batch")
    build.add_argument("--cache-dir", type=Path,
                       help="plan cache (default: $EDGE_RUNTIME_TRT_CACHE or "
                       "~/.cache/edge-runtime/trt)")
    build.add_argument("--opt-level", type=int, default=3, help="builder optimisation level")
    build.add_argument("--workspace-mb", type=int, default=0, help="tactic scratch cap (0: none)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build_engine)

    doctor = sub.add_parser("doctor", help="check JetPack, CUDA, TensorRT, ONNX Runtime, power, "
                            "memory, disk, the broker and the device certificate")
    doctor.add_argument("--config", type=Path,
                        help=f"TOML config (default: {DEVICE_CONFIG} if it exists)")
    doctor.set_defaults(func=_doctor)

    worker = sub.add_parser("cloud-worker", help="serve offloaded requests from an MQTT broker")
    worker.add_argument("--bundle", type=Path, help="bundle directory (required unless --echo)")
    worker.add_argument("--pubkey", **pubkey)  # type: ignore[arg-type]
    worker.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    worker.add_argument("--group", default="cloud", help="shared-subscription group (cloud)")
    worker.add_argument("--model", help="answer only requests for this model name ('bundle': "
                        "the bundle's name), others get model_not_found; default: any name "
                        "(devices whose model is named differently still offload)")
    add_auth_options(worker, "EDGE_CLOUD")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="requests decoded together in one continuous batch (1)")
    worker.add_argument("--chunk-tokens", type=int, default=ChunkPolicy.tokens,
                        help="streamed answers: send held tokens once this many are pending "
                        f"({ChunkPolicy.tokens}; 1 = one message per token)")
    worker.add_argument("--chunk-ms", type=float, default=ChunkPolicy.ms,
                        help="...or once the oldest has waited this long; the first text "
                        f"goes out at once ({ChunkPolicy.ms:g} ms; 0 = never hold a token)")
    worker.add_argument("--prefill-chunk", type=int, default=128,
                        help="prompt tokens prefilled per decode step, so a long prompt does "
                        "not stop the other answers (128; 0 = whole prompts)")
    worker.add_argument("--threads", type=int, help="CPU engine threads per generator")
    worker.add_argument("--backend", default="auto", help="engine backend (default: auto)")
    worker.add_argument("--echo", action="store_true",
                        help="no model: answer every request at once (to measure transport)")
    worker.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    worker.set_defaults(func=_cloud_worker)
    return p


def _trust(pubkeys: Sequence[Path]) -> list[Ed25519PublicKey]:
    trusted = trusted_keys(list(pubkeys))
    if not trusted:
        raise SignatureError(
            f"no trusted public key: pass --pubkey PEM or put *.pub files in {default_trust_dir()}"
        )
    return trusted


def _trusted_bundle(root: Path, pubkeys: Sequence[Path]) -> Bundle:
    return verify_bundle(root, _trust(pubkeys))


def _verify(args: argparse.Namespace) -> int:
    bundle = _trusted_bundle(args.bundle, args.pubkey or [])
    m = bundle.manifest
    print(f"OK {m.name} {m.version}: signed by {bundle.signer}, {len(m.files)} files verified")
    return 0


PLAN_MAX_BATCH = 16
"""A TensorRT plan's batch limit when neither --profile nor scheduler.max_batch says."""


def _build_engine(args: argparse.Namespace) -> int:
    from edge_runtime.engines.trt_build import BuildOptions, build_engine
    from edge_runtime.engines.trt_plan import ProfileLimits

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bundle = _trusted_bundle(args.bundle, args.pubkey or [])  # never build from unverified ONNX
    cfg = _device_config(args.config)
    # Unset, max_batch is measured at start-up up to what the plan decodes together: a plan
    # fixes that when it is built, so leave the measurement room.
    limits = ProfileLimits.parse(args.profile, cfg.scheduler.max_batch or PLAN_MAX_BATCH,
                                 bundle.manifest.generation.context_length)
    options = BuildOptions(limits, args.precision, args.opt_level, args.workspace_mb, args.force)
    result = build_engine(bundle, options, args.cache_dir, progress=print)
    r = result.record
    print(f"OK {'built' if result.built else 'cached'} {result.plan}: graph {r.graph!r} for "
          f"{r.target.gpu_name} (sm {r.target.compute_capability}, TensorRT "
          f"{r.target.trt_version}), {r.precision}, profile {r.profile}")
    return 0


def _device_config(path: Path | None) -> Config:
    """The config file with the fleet's remote overlay merged (its scheduler.max_batch sizes
    the TensorRT profile, so the plan matches what serve will run)."""
    if path is None:
        return Config()
    from edge_runtime.fleet.remote_config import load_device_config

    loaded = load_device_config(path, {})
    if loaded.ignored is not None:
        logging.getLogger("edge_runtime.fleet.remote_config").error("%s", loaded.ignored)
    return loaded.config


def _doctor(args: argparse.Namespace) -> int:
    from edge_runtime.doctor import report

    path = args.config or (DEVICE_CONFIG if DEVICE_CONFIG.is_file() else None)
    return report(load_config(path) if path else Config(), path)


def _serve(args: argparse.Namespace) -> int:
    flags = _serve_flags(args)
    cfg = (load_config(args.config) if args.config else Config()).override(flags)
    config_file: Path | None = args.config
    ignored: str | None = None
    if cfg.fleet.enabled and cfg.fleet.root is not None:
        from edge_runtime.fleet.daemon import config_path
        from edge_runtime.fleet.remote_config import load_device_config

        # The provisioned file (--config's, else one under the fleet root if it exists),
        # never written by the agent; what signed set-configs changed is its overlay,
        # merged over it here with the flags on top.
        config_file = config_path(cfg.fleet.root, args.config)
        base = config_file if args.config is not None or config_file.is_file() else None
        loaded = load_device_config(base, flags)
        cfg, ignored = loaded.config, loaded.ignored
    logging.basicConfig(
        level=cfg.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if ignored is not None:  # the device still serves and stays reachable: say why loudly
        logging.getLogger("edge_runtime.fleet.remote_config").error("%s", ignored)
    from edge_runtime.startup import demo_bundle, listen_socket, log_providers

    # Bound before anything slow: a port in use is a one-line error, not a traceback after
    # the model loaded; uvicorn serves on this very socket.
    sock = listen_socket(cfg.server.host, cfg.server.port)
    log_providers()
    root, pubkeys = cfg.model.bundle, cfg.model.pubkeys
    fleet = cfg.fleet.enabled
    if fleet:
        from edge_runtime.fleet.daemon import SLOTS, install_initial
        from edge_runtime.fleet.slots import Slots

        assert cfg.fleet.root is not None  # FleetConfig checks it
        slots_dir = cfg.fleet.root / SLOTS
        if root is None and not (slots_dir / "state.json").is_file():
            root, demo_key = demo_bundle()  # first boot without --bundle: the demo
            pubkeys = (*pubkeys, demo_key)
        pubkeys = cfg.fleet.pubkeys or pubkeys
        root = install_initial(Slots(slots_dir, _trust(pubkeys)), root)
    elif root is None:
        root, demo_key = demo_bundle()
        pubkeys = (*pubkeys, demo_key)
    bundle = _trusted_bundle(root, pubkeys)  # always verify before anything is loaded
    _check_server(cfg, args)
    if fleet:
        assert config_file is not None
        return _run_server(cfg, bundle, sock, (_trust(pubkeys), config_file, flags, ignored))
    return _run_server(cfg, bundle, sock)


def _check_server(cfg: Config, args: argparse.Namespace) -> None:
    """Refuse now, in one line, what would fail once serving; warn about what is open."""
    from edge_runtime.api.guard import check_tls, exposure_warnings

    if args.api_key is not None:
        print("edge-runtime: warning: --api-key is visible to every user of this machine in "
              f"`ps`; use --api-key-file FILE or ${API_KEY_ENV}", file=sys.stderr)
    check_tls(cfg.server)
    for warning in exposure_warnings(cfg.server):
        log.warning("%s", warning)


def _serve_flags(args: argparse.Namespace) -> dict[str, Any]:
    """`serve`'s flags as config keys (None: not given); they win over the file's keys."""
    return {
        "server.host": args.host,
        "server.port": args.port,
        "server.api_key": args.api_key,
        "server.api_key_file": args.api_key_file,
        "server.tls_cert_file": args.tls_cert,
        "server.tls_key_file": args.tls_key,
        "server.docs": args.docs,
        "model.bundle": args.bundle,
        "model.pubkeys": tuple(args.pubkey) if args.pubkey else None,
        "model.threads": args.threads,
        "model.backend": args.backend,
        "log.access_log": args.access_log,
        "log.level": args.log_level,
        "fleet.enabled": args.fleet,
        "fleet.broker": args.fleet_broker,
        "fleet.root": args.fleet_root,
        "fleet.device_id": args.device_id,
        "fleet.groups": tuple(args.group) if args.group else None,
    }


def _cloud_worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edge_runtime.cloud.worker import CloudWorker
    from edge_runtime.model.generator import Generator
    from edge_runtime.mqtt.client import BrokerURL

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    BrokerURL.parse(args.broker)  # a bad URL is a one-line error, before loading anything
    load = None
    model = None if args.model in (None, "bundle") else args.model
    if not args.echo:
        if args.bundle is None:
            raise ConfigError("cloud-worker needs --bundle DIR (or --echo)")
        bundle = _trusted_bundle(args.bundle, args.pubkey or [])
        if args.model == "bundle":  # another model name gets the API's 404 error
            model = bundle.manifest.name

        def load() -> Generator:
            return Generator.from_bundle(bundle, backend=args.backend, threads=args.threads)

    chunk = ChunkPolicy(args.chunk_tokens, args.chunk_ms)  # ConfigError names a bad value
    auth = auth_from_args(args, "EDGE_CLOUD")
    worker = CloudWorker(args.broker, load, group=args.group, concurrency=args.concurrency,
                         chunk=chunk, prefill_chunk=args.prefill_chunk,
                         model=model, freeze_heap=True,
                         **auth.mqtt_options())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Not subscribed yet is not fatal: the client keeps reconnecting until the broker is up.
    subscribed = worker.start()
    if worker.errors:
        raise EdgeError(f"cannot load the model: {worker.errors[0]}")
    if worker.mqtt.refusal is not None or worker.mqtt.refused_filters:
        worker.stop(drain_s=0)  # a broker that says "Not authorized" will not change its mind
        raise worker.mqtt.failure(10.0)
    state = "subscribed" if subscribed else "waiting for the broker"
    print(f"edge-runtime: cloud worker {state} on {args.broker} "
          f"(group {args.group}, concurrency {args.concurrency}, chunks of "
          f"{chunk.tokens} tokens / {chunk.ms:g} ms)", flush=True)
    stop.wait()
    worker.stop()
    log.info("cloud worker stopped: %s", dict(worker.counts))
    return 0


FleetWiring = tuple[list[Ed25519PublicKey], Path, Mapping[str, Any], str | None]
"""serve --fleet: the keys trusted to sign deploys, the config file set-config replaces, the
command-line flags (config keys) that stay on top of it, and why the remote-config overlay
was ignored (None: merged or absent)."""


def _run_server(
    cfg: Config, bundle: Bundle, sock: socket.socket, fleet: FleetWiring | None = None
) -> int:
    # Imported here so that `edge-runtime verify` does not pay for the web stack.
    import uvicorn

    from edge_runtime.api.accesslog import AccessLog
    from edge_runtime.api.app import create_app
    from edge_runtime.model.generator import Generator
    from edge_runtime.serving.cloud_view import cloud_state
    from edge_runtime.serving.engine_loop import LocalWorker
    from edge_runtime.serving.request import ModelInfo

    server: uvicorn.Server | None = None

    def load() -> Generator:
        return Generator.from_bundle(bundle, backend=cfg.model.backend, threads=cfg.model.threads)

    def on_failure(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True  # a daemon that cannot load its model must not linger

    offload = None
    if cfg.offload.broker is not None and cfg.scheduler.offload_enabled:
        from edge_runtime.offload.client import OffloadClient

        offload = OffloadClient.from_config(cfg.offload)  # started on the server's loop
    worker = LocalWorker(load, cfg.scheduler, cloud=cloud_state(offload, cfg.scheduler),
                         on_failure=on_failure, freeze_heap=True)
    access_log = AccessLog.open(cfg.log.access_log)
    app = create_app(worker, ModelInfo.from_bundle(bundle), cfg, access_log, offload)
    if fleet is not None:  # the app's lifespan starts it once the model is warm
        from edge_runtime.fleet.daemon import attach

        trust, config_file, flags, ignored = fleet
        attach(app, worker, cfg, trust, bundle.root, config_file, flags,
               cloud_path=offload is not None, overlay_ignored=ignored)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.server.host,
            port=cfg.server.port,
            log_level=cfg.log.level,
            access_log=False,  # ours is structured (accesslog.py)
            lifespan="on",
            ssl_certfile=cfg.server.tls_cert_file,
            ssl_keyfile=cfg.server.tls_key_file,
        )
    )
    try:
        asyncio.run(_serve_until_exit(server, sock, worker, bundle, offload))
    finally:
        sdnotify.notify("STOPPING=1")
        if access_log is not None:
            access_log.close()
    if worker.error is not None:
        raise EdgeError(f"cannot serve {bundle.root}: {worker.error}")
    return 0


async def _serve_until_exit(
    server: uvicorn.Server, sock: socket.socket, worker: LocalWorker, bundle: Bundle,
    offload: OffloadClient | None,
) -> None:
    """Run uvicorn; print the URL once it listens and the model is warmed up."""
    if offload is not None:
        # Its MQTT I/O runs on this loop, where requests are offloaded and answers consumed;
        # it connects in the background and keeps retrying.
        offload.start(loop=asyncio.get_running_loop())
    try:
        await _serve_and_announce(server, sock, worker, bundle)
    finally:
        if offload is not None:
            offload.stop()


async def _serve_and_announce(
    server: uvicorn.Server, sock: socket.socket, worker: LocalWorker, bundle: Bundle
) -> None:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not (server.started and worker.ready) and not task.done():
        await asyncio.sleep(0.05)
    if task.done():
        await task
        return
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    m = bundle.manifest
    scheme = "https" if server.config.ssl_certfile else "http"
    url = f"{scheme}://{shown}:{port}/v1"
    print(f"edge-runtime: serving {m.name} {m.version} at {url}", flush=True)
    # systemd (Type=notify): started means warm and listening; the pings come from this loop.
    sdnotify.notify(f"READY=1\nSTATUS=serving {m.name} {m.version} at {url}")
    interval = sdnotify.watchdog_interval()
    while interval is not None and not task.done():
        sdnotify.notify("WATCHDOG=1")
        await asyncio.wait({task}, timeout=interval)
    await task
