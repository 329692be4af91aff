"""One Mosquitto launcher for the test suite and the scripts: a real broker on a free loopback
port, from a generated config, that can be killed (-9) and restarted on the same port.

    b = Broker(workdir)                          persistence off, anonymous, plain MQTT
    b = Broker(workdir, persistence=True)        store saved after every change (see below)
    b = Broker(workdir, pki=make_pki(dir))       TLS only, client certificate required
    b = Broker(workdir, acl_file=..., password_file=write_passwords(path, {"dev": pw}),
               extra=["max_connections -1"])      any other mosquitto.conf lines
    b.start(); b.url; b.kill(); b.start()        same port: clients reconnect by themselves
    with Broker(workdir) as b: ...               start, then stop (SIGTERM, SIGKILL after)

Where it lives, and why here: the tests (pytest's `pythonpath` in pyproject.toml names
`tests` and `scripts`) and the scripts (each puts scripts/ first on sys.path by being run
from there) both import it by its bare name, and it needs nothing but the standard library
and `cryptography` (a base dependency, for `make_pki`), so a benchmark does not drag pytest
in. The pytest fixtures built on it are tests/mqtt_fixtures.py.

Persistence: Mosquitto writes its store only at exit and at autosave, so a `kill -9` loses
what arrived since the last save: the config saves after every change
(`autosave_on_changes true`, `autosave_interval 1`), the setting docs/FLEET.md asks of a
production broker. `own_group=True` starts the broker in a process group of its own
(`start_new_session`), so that a script's Ctrl-C does not reach it before its `finally` and
signals go to the group (scripts/overload/procs.py stops every process it spawned that way).
Logs (error and warning, more with `log_types`) go to `workdir/mosquitto.log`; a broker that
does not start raises RuntimeError quoting the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
"""The broker binary, or None when it is not installed (tests skip, scripts say so)."""


def free_port() -> int:
    """A TCP port free on loopback now (the OS's choice; a race with others is harmless
    here: a broker that cannot bind says so in its log)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate (127.0.0.1, localhost) and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing the broker trusts, with a client pair of its own."""
    other_cert: Path
    other_key: Path


def make_pki(out: Path, client_cn: str = "dev-1") -> Pki:
    """Generate the PKI with `cryptography` (ECDSA P-256, valid for a day)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
              ) -> tuple[Path, Path]:
        c, k = out / f"{stem}.pem", out / f"{stem}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return c, k

    def issue(cn: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
              ca: bool = False, server: bool = False) -> tuple[x509.Certificate,
                                                                ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        iname, ikey = issuer if issuer is not None else (name(cn), key)
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(iname)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        elif not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                critical=False)
        return b.sign(ikey, hashes.SHA256()), key

    ca_cert, ca_key = issue("edge test CA", None, ca=True)
    server = issue("127.0.0.1", (ca_cert.subject, ca_key), server=True)
    client = issue(client_cn, (ca_cert.subject, ca_key))
    other_ca_cert, other_ca_key = issue("rogue CA", None, ca=True)
    other = issue(client_cn, (other_ca_cert.subject, other_ca_key))
    ca_path, _ = write("ca", ca_cert, ca_key)
    other_ca_path, _ = write("other-ca", other_ca_cert, other_ca_key)
    return Pki(ca_path, *write("server", *server), *write("client", *client),
               other_ca_path, *write("other-client", *other))


def issue_client(pki: Pki, cn: str, out: Path | None = None, expired: bool = False
                 ) -> tuple[Path, Path]:
    """Another client certificate and key (CN `cn`) signed by `pki`'s CA (its key lies next
    to it): one identity per device, operator or worker of a test. `expired`: valid from
    two days ago until yesterday, for the broker to refuse."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.with_suffix(".key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - (datetime.timedelta(days=2) if expired
                                     else datetime.timedelta(minutes=5)))
            .not_valid_after(now + (-datetime.timedelta(days=1) if expired
                                    else datetime.timedelta(days=1)))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = out or pki.ca.parent
    c, k = out / f"{cn}.pem", out / f"{cn}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


def write_passwords(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (`password_file`) for test users, written without
    `mosquitto_passwd -b` so that no password is in a process's argv: `user:$6$salt$hash`,
    hash = SHA-512(password + salt), base64 (the format Mosquitto 1.4-2.x reads)."""
    import base64
    import hashlib

    lines = []
    for user, password in users.items():
        salt = os.urandom(12)
        digest = hashlib.sha512(password.encode() + salt).digest()
        lines.append(f"{user}:$6${base64.b64encode(salt).decode()}"
                     f"${base64.b64encode(digest).decode()}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


class Broker:
    """One Mosquitto process on loopback; `port` is fixed for the object's life."""

    def __init__(
        self,
        workdir: Path,
        persistence: bool = False,
        pki: Pki | None = None,
        *,
        port: int | None = None,
        acl_file: Path | None = None,
        password_file: Path | None = None,
        extra: Iterable[str] = (),
        log_types: Iterable[str] = ("error", "warning"),
        own_group: bool = False,
        config: str | None = None,
    ) -> None:
        """`config`: a whole mosquitto.conf to run instead of the generated one (the shipped
        deploy/mosquitto config, rewritten onto a test's files); `port` is then the listener
        `start` waits for (one of `config`'s)."""
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.workdir = workdir
        self.log = workdir / "mosquitto.log"
        self.config = workdir / "mosquitto.conf"
        self.tls = pki is not None or config is not None
        self.own_group = own_group
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Anonymous clients only where nothing else says who a client is.
            f"allow_anonymous {'false' if password_file else 'true'}",
            "set_tcp_nodelay true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {workdir}/",
            # Save the store after every change (message queued, session changed), not
            # every 30 minutes: a broker killed right after it PUBACKed a command for an
            # offline device still has the command when it comes back.
            "autosave_on_changes true",
            "autosave_interval 1",
            *(f"log_type {t}" for t in log_types),
            "log_dest stderr",
        ]
        if pki is not None:
            lines[1:1] = [f"cafile {pki.ca}", f"certfile {pki.server_cert}",
                          f"keyfile {pki.server_key}", "require_certificate true",
                          "tls_version tlsv1.2"]
        if password_file is not None:
            lines.append(f"password_file {password_file}")
        if acl_file is not None:
            lines.append(f"acl_file {acl_file}")
        lines.extend(extra)
        if config is not None:
            lines = config.splitlines()
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to its own user, losing workdir
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the broker was never started"
        return self.proc.pid

    def start(self, timeout_s: float = 10.0) -> Broker:
        """Start on this broker's port and wait until it accepts connections."""
        assert not self.running
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(MOSQUITTO), "-c", str(self.config)], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, start_new_session=self.own_group,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"mosquitto did not start on port {self.port}: {self.tail()}"
                    ) from None
                time.sleep(0.01)

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            if self.own_group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT, no Will delay courtesy; clients see the socket close."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM (Mosquitto saves its store), SIGKILL after `grace_s`."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def tail(self, chars: int = 2000) -> str:
        """The end of the broker's log (for error messages)."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def store(self) -> Path:
        return self.workdir / "mosquitto.db"

    def wait_saved(self, needle: bytes, timeout_s: float = 5.0) -> None:
        """Until the broker's store on disk holds `needle` (a message's payload).

        Mosquitto PUBACKs a message and saves its store (autosave) in the same event-loop
        turn, the PUBACK first (a few ms apart here). A kill -9 inside that window
        loses the message; the controller covers it by re-sending commands the device has
        not acknowledged (command ids make that safe)."""
        deadline = time.monotonic() + timeout_s
        while not (self.store.exists() and needle in self.store.read_bytes()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not save {needle!r} in {timeout_s} s")
            time.sleep(0.001)

    def __enter__(self) -> Broker:
        return self if self.running else self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
