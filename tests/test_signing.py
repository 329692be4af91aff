from __future__ import annotations

import stat

import pytest

from edge_runtime import signing
from edge_runtime.errors import SignatureError


def test_keygen_sign_verify_roundtrip(tmp_path):
    kid = signing.generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    key = signing.load_private_key(tmp_path / "k.key")
    pub = signing.load_public_key(tmp_path / "k.pub")
    doc = signing.sign(b"hello", key)
    assert signing.verify(b"hello", doc, [pub]) == kid
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify(b"hellp", doc, [pub])
    with pytest.raises(SignatureError, match="malformed"):
        signing.verify(b"hello", b"{not json", [pub])
    with pytest.raises(FileExistsError):
        signing.generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")


def test_trust_dir_from_environment(tmp_path, monkeypatch):
    signing.generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    monkeypatch.setenv("EDGE_RUNTIME_TRUST_DIR", str(tmp_path))
    assert len(signing.trusted_keys()) == 1
    with pytest.raises(SignatureError, match="cannot read public key"):
        signing.trusted_keys([tmp_path / "nope.pub"])
