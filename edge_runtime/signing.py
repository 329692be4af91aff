"""Ed25519 keys and detached manifest signatures.

Keys are standard PEM files (PKCS#8 private, SubjectPublicKeyInfo public), so `openssl pkey`
can read them. A key is named by its id: the first 16 hex digits of the SHA-256 of its raw
32-byte public key. The signature file next to a manifest is a small JSON document:
`{"algorithm": "ed25519", "key_id": "...", "signature": "<base64>"}` over the manifest's
exact bytes.

Key files are strict: a key file is one PEM block and nothing else (blank lines around it
allowed), at most MAX_KEY_FILE_BYTES. A PEM block found inside some other file (a config
file, a journal, a log) is refused, so writing text into a file the daemon reads never turns
that text into a trusted key. A trust directory contributes its `*.pub` regular files only.

Fleet commands (fleet/command_auth.py) are signed over `canonical_json(doc)`: sorted keys,
no spaces, ASCII only, no NaN, so signer and verifier hash the same bytes whatever order a
JSON library wrote the fields in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.atomic import atomic_write_bytes
from edge_runtime.errors import SignatureError

ALGORITHM = "ed25519"
MAX_KEY_FILE_BYTES = 16 << 10
"""An ed25519 PEM key is ~120 bytes; a bigger file is not a key file."""
_PEM_PUBLIC = ("-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----")
_PEM_PRIVATE = ("-----BEGIN PRIVATE KEY-----", "-----END PRIVATE KEY-----")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path, overwrite: bool = False) -> str:
    """Write a new key pair (private key mode 0600); return its key id."""
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; refusing to overwrite a key (pass overwrite)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(private_path, private_pem)
    os.chmod(private_path, 0o600)
    atomic_write_bytes(public_path, public_pem)
    return key_id(key.public_key())


def _read_pem(path: Path, kind: str, armor: tuple[str, str]) -> bytes:
    """The file's bytes if the whole file is one PEM block of `armor`, else SignatureError."""
    p = Path(path)
    try:
        if not p.is_file():
            raise SignatureError(f"cannot read {kind} key {p}: not a regular file")
        if p.stat().st_size > MAX_KEY_FILE_BYTES:
            raise SignatureError(f"{p} is {p.stat().st_size} bytes: not a {kind} key file "
                                 f"(a key file holds one PEM block, at most "
                                 f"{MAX_KEY_FILE_BYTES} bytes)")
        data = p.read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read {kind} key {p}: {e}") from e
    text = data.strip()
    begin, end = (a.encode() for a in armor)
    # Exactly one block, and nothing before or after it: a key embedded in another file
    # (config.toml, a journal) is not a key file, whatever the PEM parser would accept.
    if not (text.startswith(begin) and text.endswith(end) and text.count(b"-----BEGIN") == 1):
        raise SignatureError(f"{p} is not a PEM {kind} key file: it must hold one "
                             f"'{armor[0]}' block and nothing else")
    return text + b"\n"


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_pem(path, "private", _PEM_PRIVATE)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"cannot read private key {path}: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_pem(path, "public", _PEM_PUBLIC)
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise SignatureError(f"cannot read public key {path}: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The detached signature document (JSON bytes) for `data`."""
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(data)).decode("ascii"),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def verify(data: bytes, signature_doc: bytes, trusted: list[Ed25519PublicKey]) -> str:
    """Check `signature_doc` over `data` against trusted keys; return the signer's key id."""
    try:
        doc = json.loads(signature_doc)
        algorithm, kid, sig = doc["algorithm"], doc["key_id"], base64.b64decode(doc["signature"])
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"malformed signature file: {e}") from e
    if algorithm != ALGORITHM:
        raise SignatureError(f"unsupported signature algorithm {algorithm!r}")
    if not trusted:
        raise SignatureError("no trusted public key configured to verify the signature")
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(kid)
    if key is None:
        raise SignatureError(
            f"manifest signed by key {kid}, which is not trusted (trusted: {sorted(by_id)})"
        )
    try:
        key.verify(sig, data)
    except InvalidSignature as e:
        raise SignatureError(f"bad signature: manifest does not match key {kid}") from e
    return str(kid)


def default_trust_dir() -> Path:
    """Where the daemon looks for trusted public keys (`*.pub`) unless told otherwise."""
    env = os.environ.get("EDGE_RUNTIME_TRUST_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "edge-runtime" / "trusted-keys"


def load_public_keys(paths: list[Path] | tuple[Path, ...]) -> list[Ed25519PublicKey]:
    """Keys from files and directories (a directory: its `*.pub` regular files, sorted).

    Symlinks inside a directory are skipped: a trust store is what provisioning wrote there,
    not whatever a link points to. A named path that does not exist is an error."""
    out: list[Ed25519PublicKey] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            out += [load_public_key(f) for f in sorted(p.glob("*.pub"))
                    if f.is_file() and not f.is_symlink()]
        else:
            out.append(load_public_key(p))
    return out


def canonical_json(doc: object) -> bytes:
    """The bytes a command signature covers (see the module docstring)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sign_raw(data: bytes, key: Ed25519PrivateKey) -> str:
    """A bare base64 ed25519 signature of `data`."""
    return base64.b64encode(key.sign(data)).decode("ascii")


def verify_raw(data: bytes, signature_b64: str, kid: str,
               trusted: dict[str, Ed25519PublicKey]) -> None:
    """Check a bare signature by key `kid` among `trusted` (by key id); SignatureError."""
    key = trusted.get(kid)
    if key is None:
        raise SignatureError(f"signed by key {kid!r}, which is not trusted here")
    try:
        sig = base64.b64decode(signature_b64, validate=True)
        key.verify(sig, data)
    except (ValueError, TypeError, InvalidSignature):
        raise SignatureError(f"bad signature: the content does not match key {kid}") from None


def trusted_keys(paths: list[Path] | None = None) -> list[Ed25519PublicKey]:
    """Explicit key files, or else every `*.pub` in the default trust directory."""
    if paths:
        return load_public_keys(paths)
    d = default_trust_dir()
    return load_public_keys([d]) if d.is_dir() else []
