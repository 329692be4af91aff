"""Bundles for tests: the tiny model's built bundle (`BuiltBundle`, made by conftest.py's
`tiny_bundle`), and synthetic signed bundles — a few random files and a real signature.

Slots, downloads and deploys never look inside a graph, so what they are tested with needs
no model; used by tests/test_slots.py and scripts/deploy_crash_matrix.py (both run on the
device leg's base install). Tests import from here, never from a conftest: tests/build has a
conftest.py of its own, and two modules named `conftest` cannot both be imported by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edge_runtime import signing
from edge_runtime.bundle.manifest import write_bundle


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    """The signed int4 bundle."""
    pubkey: Path
    key: Path
    work: Path
    """The stage artifacts: model/ (HF), onnx/ (fp32), int4/ (quantized)."""


def make_bundle(out: Path, key_path: Path, version: str, size: int = 300_000) -> Path:
    """Bundle `synthetic` `version` at `out`: `size` random bytes as its decoder graph."""
    src = out.parent / f"{out.name}.src"
    src.mkdir(parents=True)
    (src / "model.onnx").write_bytes(os.urandom(size))
    (src / "tokenizer.json").write_text(json.dumps({"v": version}))
    fields = {
        "name": "synthetic", "version": version, "task": "text-generation",
        "tokenizer": {"file": "tokenizer.json", "config_file": None, "chat_template": None,
                      "bos_token": None, "eos_token": None},
        "generation": {"eos_token_ids": [0], "context_length": 64},
        "graphs": {"decoder": {"file": "model.onnx", "format": "onnx", "inputs": [],
                               "outputs": []}},
    }
    return write_bundle(out, {"model.onnx": src / "model.onnx",
                              "tokenizer.json": src / "tokenizer.json"},
                        fields, signing.load_private_key(key_path))
