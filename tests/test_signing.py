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


def test_a_key_file_is_one_pem_block_and_nothing_else(tmp_path):
    """A key planted inside another file (config.toml, a journal) is never a trusted key."""
    signing.generate_keypair(tmp_path / "op.key", tmp_path / "op.pub")
    pem = (tmp_path / "op.pub").read_text()
    config = tmp_path / "config.toml"
    config.write_text(f'[log]\nlevel = "info"\n# planted:\n# x\n{pem}')
    journal = tmp_path / "commands.json"
    journal.write_text('{"commands": [{"params": {"toml": "' + pem.replace("\n", "\\n") + '"}}]}')
    trailing = tmp_path / "trailing.pub"
    trailing.write_text(pem + "[fleet]\nbroker = 'mqtt://evil:1883'\n")
    two = tmp_path / "two.pub"
    two.write_text(pem + pem)
    for path in (config, journal, trailing, two):
        with pytest.raises(SignatureError, match="is not a PEM public key file"):
            signing.load_public_key(path)
    big = tmp_path / "big.pub"
    big.write_text(pem + "\n" * signing.MAX_KEY_FILE_BYTES)
    with pytest.raises(SignatureError, match="not a public key file"):
        signing.load_public_key(big)
    with pytest.raises(SignatureError, match="not a PEM private key file"):
        signing.load_private_key(config)
    assert signing.key_id(signing.load_public_key(tmp_path / "op.pub"))  # the real one loads
    (tmp_path / "op.pub").write_text("\n\n" + pem + "\n")  # blank lines around it are fine
    signing.load_public_key(tmp_path / "op.pub")


def test_a_trust_directory_is_its_pub_files_only(tmp_path):
    trust = tmp_path / "operators"
    trust.mkdir()
    kid = signing.generate_keypair(tmp_path / "a.key", trust / "a.pub")
    signing.generate_keypair(tmp_path / "b.key", tmp_path / "b.pub")
    (trust / "config.toml").write_text((tmp_path / "b.pub").read_text())  # not *.pub
    (trust / "link.pub").symlink_to(tmp_path / "b.pub")  # a link: not provisioned here
    keys = signing.load_public_keys([trust])
    assert [signing.key_id(k) for k in keys] == [kid]
    (trust / "bad.pub").write_text("# a comment\n" + (tmp_path / "b.pub").read_text())
    with pytest.raises(SignatureError, match=r"bad\.pub is not a PEM public key file"):
        signing.load_public_keys([trust])


def test_raw_signatures_over_canonical_json():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    doc = {"b": [1, 2.5, "é"], "a": {"y": True, "x": None}}
    data = signing.canonical_json(doc)
    assert data == b'{"a":{"x":null,"y":true},"b":[1,2.5,"\\u00e9"]}'
    sig = signing.sign_raw(data, key)
    trusted = {signing.key_id(key.public_key()): key.public_key()}
    signing.verify_raw(data, sig, signing.key_id(key.public_key()), trusted)
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify_raw(data + b" ", sig, signing.key_id(key.public_key()), trusted)
    with pytest.raises(SignatureError, match="not trusted"):
        signing.verify_raw(data, sig, "0" * 16, trusted)
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify_raw(data, "***", signing.key_id(key.public_key()), trusted)
    with pytest.raises(ValueError):
        signing.canonical_json({"x": float("nan")})
