"""Shared fixtures: one tiny demo bundle per test session, built locally with a fixed seed.

Building it (tokenizer training, a few training steps, export, quantize, package) takes about
twenty seconds on two cores; every test that needs a model shares it. Tests that alter a bundle
copy it first (`bundle_copy`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class BuiltBundle:
    path: Path
    """The signed int4 bundle."""
    pubkey: Path
    key: Path
    work: Path
    """The stage artifacts: model/ (HF), onnx/ (fp32), int4/ (quantized)."""


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> BuiltBundle:
    # The device-runtime leg (Python 3.10, base install, no torch) cannot build a model: it
    # is handed one built by `edge-build demo --preset tiny` (see scripts/test.sh).
    prebuilt = os.environ.get("EDGE_TEST_PREBUILT")
    if prebuilt:
        root = Path(prebuilt)
        work = root / "bundle.work"
        return BuiltBundle(path=root / "bundle", pubkey=work / "signing.pub",
                           key=work / "signing.key", work=work)
    pytest.importorskip("torch")
    from edge_build.demo import build_demo

    root = tmp_path_factory.mktemp("tiny")
    work = root / "work"
    bundle = build_demo(root / "bundle", preset="tiny", work_dir=work, progress=False)
    return BuiltBundle(path=bundle, pubkey=work / "signing.pub", key=work / "signing.key",
                       work=work)


@pytest.fixture
def bundle_copy(tiny_bundle: BuiltBundle, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, dst)
    return dst


# A real Mosquitto per test (`broker`, `persistent_broker`): see mqtt_fixtures.py.
from mqtt_fixtures import broker, persistent_broker  # noqa: E402, F401
