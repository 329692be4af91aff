"""Operator-signed fleet commands: how a controller signs one and how a device checks it.

    signer = CommandSigner.from_file(Path("operator.key"))
    payload = signer.sign(Command("c-46", "drain"), target=device_target("dev-1"))

    verifier = CommandVerifier("dev-1", groups=("lab",), operators=[pubkey])
    auth = verifier.check(doc, topic)          # CommandAuthError says why not

A signed command is the plain command (messages.py) plus an `auth` object:

    {"v": 1, "id": "c-46", "type": "drain", "params": {},
     "auth": {"target": "device:dev-1", "issued": 1765000000, "expires": 1765086400,
              "nonce": "<32 hex>", "key_id": "<16 hex>", "sig": "<base64>"}}

`sig` is the ed25519 signature, by the operator key `key_id`, of `signing.canonical_json`
of the whole document with `auth.sig` left out: id, type, params, target, times and nonce
are all covered, so none can be changed, and the command cannot be moved to another device
or group. The device checks, in this order: the signature against its operator trust store
(separate from the bundle signers: an operator key cannot sign a bundle and a bundle key
cannot command a device), the target (this device, or a group it belongs to, on the topic
of that device or group), the times (not expired; issued no later than CLOCK_SKEW_S ahead
of the device's clock; expiring at most MAX_TTL_S after it was issued), and then, in the
journal (journal.py), the nonce: a nonce is remembered until its command expires, so a
replayed command is refused even after its id left the journal.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime import signing
from edge_runtime.errors import CommandAuthError, SignatureError
from edge_runtime.fleet import messages as fm
from edge_runtime.mqtt import topics

DEFAULT_TTL_S = 24 * 3600
"""How long a command stays valid unless its sender says otherwise (queued for an offline
device meanwhile)."""
MAX_TTL_S = 8 * 24 * 3600
"""The longest validity a device accepts: it remembers every nonce that long."""
CLOCK_SKEW_S = 300
"""How far ahead of the device's clock a command may have been issued."""
_NONCE_CHARS = frozenset("0123456789abcdef")


def device_target(device: str) -> str:
    return f"device:{topics.check_device(device)}"


def group_target(group: str) -> str:
    return f"group:{topics.check_id(group, 'group')}"


def payload_digest(payload: bytes) -> str:
    """What the audit log and a refusal's ack keep of an unverified payload."""
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class Auth:
    key_id: str
    target: str
    issued: int
    expires: int
    nonce: str


class CommandSigner:
    """An operator's private key, signing commands for one device or one group."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.key_id = signing.key_id(key.public_key())

    @classmethod
    def from_file(cls, path: Path) -> CommandSigner:
        return cls(signing.load_private_key(path))

    def sign(self, cmd: fm.Command, target: str, ttl_s: float = DEFAULT_TTL_S,
             now: float | None = None) -> bytes:
        return self.sign_doc({"v": fm.SCHEMA_VERSION, "id": cmd.id, "type": cmd.type,
                              "params": dict(cmd.params)}, target, ttl_s, now)

    def sign_doc(self, doc: Mapping[str, Any], target: str, ttl_s: float = DEFAULT_TTL_S,
                 now: float | None = None, nonce: str | None = None) -> bytes:
        """Any JSON object signed as a command (tests sign malformed ones with it)."""
        issued = int(time.time() if now is None else now)
        out = dict(doc)
        out["auth"] = {"target": target, "issued": issued, "expires": issued + int(ttl_s),
                       "nonce": nonce or secrets.token_hex(16), "key_id": self.key_id}
        out["auth"]["sig"] = signing.sign_raw(signing.canonical_json(out), self.key)
        return signing.canonical_json(out)


class CommandVerifier:
    def __init__(self, device: str, groups: tuple[str, ...],
                 operators: list[Ed25519PublicKey],
                 clock: Callable[[], float] = time.time) -> None:
        self.device = device
        self.groups = frozenset(groups)
        self.operators = {signing.key_id(k): k for k in operators}
        self.clock = clock

    def check(self, doc: Mapping[str, Any], topic: str) -> Auth:
        """The command's verified auth, or CommandAuthError with the reason."""
        auth = doc.get("auth")
        if auth is None:
            raise CommandAuthError("unsigned command refused: every fleet command must be "
                                   "signed by an operator key (edge-fleet --key)")
        if not isinstance(auth, dict):
            raise CommandAuthError("command auth must be a JSON object")
        kid, sig = auth.get("key_id"), auth.get("sig")
        if not isinstance(kid, str) or not isinstance(sig, str):
            raise CommandAuthError("command auth needs key_id and sig (strings)")
        if not self.operators:
            raise CommandAuthError("no operator key is trusted on this device ([fleet] "
                                   "operator_keys): every command is refused")
        unsigned = dict(doc)
        unsigned["auth"] = {k: v for k, v in auth.items() if k != "sig"}
        try:
            data = signing.canonical_json(unsigned)
        except (ValueError, TypeError) as e:
            raise CommandAuthError(f"command cannot be encoded canonically: {e}") from None
        try:
            signing.verify_raw(data, sig, kid, self.operators)
        except SignatureError as e:
            raise CommandAuthError(f"operator signature refused: {e}") from None
        a = self._fields(auth, kid)
        self._check_target(a.target, topic)
        now = self.clock()
        if now > a.expires:
            raise CommandAuthError(f"command expired at {a.expires} (device time {now:.0f}); "
                                   "send a freshly signed one")
        if a.issued > now + CLOCK_SKEW_S:
            raise CommandAuthError(f"command issued at {a.issued}, in the future of the "
                                   f"device's clock ({now:.0f}) by more than {CLOCK_SKEW_S} s")
        if a.expires - a.issued > MAX_TTL_S:
            raise CommandAuthError(f"command valid for {a.expires - a.issued} s, more than "
                                   f"the {MAX_TTL_S} s a device accepts")
        return a

    def _fields(self, auth: Mapping[str, Any], kid: str) -> Auth:
        target, nonce = auth.get("target"), auth.get("nonce")
        issued, expires = auth.get("issued"), auth.get("expires")
        if not isinstance(target, str):
            raise CommandAuthError("command auth.target must be 'device:ID' or 'group:ID'")
        for name, v in (("issued", issued), ("expires", expires)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise CommandAuthError(f"command auth.{name} must be integer Unix seconds")
        if (not isinstance(nonce, str) or not 16 <= len(nonce) <= 64
                or not set(nonce) <= _NONCE_CHARS):
            raise CommandAuthError("command auth.nonce must be 16-64 lowercase hex digits")
        assert isinstance(issued, int) and isinstance(expires, int)
        return Auth(kid, target, issued, expires, nonce)

    def _check_target(self, target: str, topic: str) -> None:
        kind, _, name = target.partition(":")
        if kind == "device":
            ok = name == self.device and topic == topics.fleet_cmd(self.device)
        elif kind == "group":
            ok = name in self.groups and topic == topics.fleet_group_cmd(name)
        else:
            raise CommandAuthError(f"command target {target!r} must be 'device:ID' or "
                                   "'group:ID'")
        if not ok:
            raise CommandAuthError(f"command is for {target!r}, not for this device "
                                   f"({self.device}, groups {sorted(self.groups)}) on {topic}")
