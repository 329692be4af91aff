"""Bundle verification against real files: every tampered byte is caught and named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_runtime.bundle.manifest import MANIFEST, SIGNATURE, Manifest, verify_bundle, write_bundle
from edge_runtime.errors import BundleError, BundleIntegrityError, SignatureError
from edge_runtime.signing import generate_keypair, load_private_key, load_public_key


def _files(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, SIGNATURE)
    )


def test_verifies_and_names_signer(tiny_bundle):
    b = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    assert b.manifest.name == "edge-demo"
    assert b.manifest.task == "text-generation"
    assert b.graph().kv_cache is not None and b.graph().last_token_logits
    assert len(b.signer) == 16
    assert set(b.manifest.files) == set(_files(tiny_bundle.path))


def test_every_file_tamper_is_rejected_naming_the_file(bundle_copy, tiny_bundle):
    key = [load_public_key(tiny_bundle.pubkey)]
    for rel in _files(bundle_copy):
        p = bundle_copy / rel
        original = p.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01  # one bit, same size: only the hash can tell
        p.write_bytes(bytes(flipped))
        with pytest.raises(BundleIntegrityError, match="SHA-256") as e:
            verify_bundle(bundle_copy, key)
        assert e.value.path == rel
        p.write_bytes(original)
    verify_bundle(bundle_copy, key)  # restored: valid again


def test_manifest_tamper_breaks_signature(bundle_copy, tiny_bundle):
    m = bundle_copy / MANIFEST
    m.write_bytes(m.read_bytes().replace(b'"edge-demo"', b'"edge-dem0"'))
    with pytest.raises(SignatureError, match="bad signature"):
        verify_bundle(bundle_copy, [load_public_key(tiny_bundle.pubkey)])


def test_truncated_missing_and_extra_files(bundle_copy, tiny_bundle):
    key = [load_public_key(tiny_bundle.pubkey)]
    tok = bundle_copy / "tokenizer/tokenizer.json"
    data = tok.read_bytes()
    tok.write_bytes(data[:-10])
    with pytest.raises(BundleIntegrityError, match="size") as e:
        verify_bundle(bundle_copy, key)
    assert e.value.path == "tokenizer/tokenizer.json"
    tok.unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        verify_bundle(bundle_copy, key)
    tok.write_bytes(data)
    (bundle_copy / "model" / "evil.onnx").write_bytes(b"x")
    with pytest.raises(BundleIntegrityError, match="not listed") as e:
        verify_bundle(bundle_copy, key)
    assert e.value.path == "model/evil.onnx"


def test_untrusted_key_and_missing_signature(bundle_copy, tmp_path):
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(SignatureError, match="not trusted"):
        verify_bundle(bundle_copy, [load_public_key(tmp_path / "other.pub")])
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify_bundle(bundle_copy, [])
    (bundle_copy / SIGNATURE).unlink()
    with pytest.raises(BundleIntegrityError, match=r"manifest\.sig"):
        verify_bundle(bundle_copy, [load_public_key(tmp_path / "other.pub")])


def test_write_bundle_is_all_or_nothing(tiny_bundle, tmp_path):
    fields = json.loads((tiny_bundle.path / MANIFEST).read_text())
    del fields["files"], fields["schema_version"]
    key = load_private_key(tiny_bundle.key)
    src = {"model/decoder.onnx": tiny_bundle.path / "model/decoder.onnx",
           "tokenizer/tokenizer.json": tiny_bundle.path / "tokenizer/tokenizer.json"}
    fields["tokenizer"]["config_file"] = None
    out = write_bundle(tmp_path / "b", src, fields, key)
    verify_bundle(out, [key.public_key()])
    with pytest.raises(BundleError, match="exists"):
        write_bundle(out, src, fields, key)
    # A manifest error (bad task) leaves neither the bundle nor a temp dir behind.
    with pytest.raises(BundleError, match="task"):
        write_bundle(tmp_path / "c", src, {**fields, "task": "painting"}, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_manifest_rejects_unknown_schema_and_missing_keys():
    with pytest.raises(BundleError, match="schema_version 99"):
        Manifest.from_dict({"schema_version": 99, "task": "text-generation"})
    with pytest.raises(BundleError, match="missing required key 'graphs'"):
        Manifest.from_dict({"schema_version": 1, "task": "text-generation", "name": "x",
                            "version": "1", "tokenizer": {}, "generation": {}})


def _relink(p: Path, target: Path) -> None:
    """Replace `p` by a symlink to `target` (a copy of what `p` held, so only the link differs)."""
    p.rename(target)
    p.symlink_to(target)


@pytest.mark.parametrize("rel", [MANIFEST, SIGNATURE, "tokenizer/tokenizer.json", "tokenizer"])
def test_a_symlink_anywhere_is_refused_naming_it(bundle_copy, tiny_bundle, tmp_path, rel):
    """A link to identical bytes is refused too: what was verified must be what is loaded."""
    key = [load_public_key(tiny_bundle.pubkey)]
    _relink(bundle_copy / rel, tmp_path / "elsewhere")
    with pytest.raises(BundleIntegrityError, match="symbolic link") as e:
        verify_bundle(bundle_copy, key)
    assert e.value.path == rel and rel in str(e.value) and "missing" not in str(e.value)


def test_an_unlisted_symlink_and_a_fifo_are_refused(bundle_copy, tiny_bundle, tmp_path):
    key = [load_public_key(tiny_bundle.pubkey)]
    (bundle_copy / "model" / "extra").symlink_to("/etc/passwd")
    with pytest.raises(BundleIntegrityError, match=r"model/extra: is a symbolic link \(to /etc"):
        verify_bundle(bundle_copy, key)
    (bundle_copy / "model" / "extra").unlink()
    os.mkfifo(bundle_copy / "model" / "pipe")
    with pytest.raises(BundleIntegrityError, match="model/pipe: is not a plain file"):
        verify_bundle(bundle_copy, key)


def test_the_root_may_be_an_operators_link(bundle_copy, tiny_bundle, tmp_path):
    (tmp_path / "current").symlink_to(bundle_copy)
    verify_bundle(tmp_path / "current", [load_public_key(tiny_bundle.pubkey)])
