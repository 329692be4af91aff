"""Ed25519 keys and detached manifest signatures.

Keys are standard PEM files (PKCS#8 private, SubjectPublicKeyInfo public), so `openssl pkey`
can read them. A key is named by its id: the first 16 hex digits of the SHA-256 of its raw
32-byte public key. The signature file next to a manifest is a small JSON document:
`{"algorithm": "ed25519", "key_id": "...", "signature": "<base64>"}` over the manifest's
exact bytes.
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


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise SignatureError(f"cannot read private key {path}: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
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


def trusted_keys(paths: list[Path] | None = None) -> list[Ed25519PublicKey]:
    """Explicit key files, or else every `*.pub` in the default trust directory."""
    if paths:
        return [load_public_key(p) for p in paths]
    d = default_trust_dir()
    return [load_public_key(p) for p in sorted(d.glob("*.pub"))] if d.is_dir() else []
