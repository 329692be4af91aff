"""Shared fixtures: one tiny demo bundle per test session, built locally with a fixed seed.

Building it (tokenizer training, a few training steps, export, quantize, package) takes about
twenty seconds on two cores; every test that needs a model shares it. Tests that alter a bundle
copy it first (`bundle_copy`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from bundle_fixtures import BuiltBundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> BuiltBundle:
    # The device-runtime leg (Python 3.10, base install, no torch) cannot build a model: it
    # is handed one built by `edge-build demo --preset tiny` (see scripts/test.sh).
    prebuilt = os.environ.get("EDGE_TEST_PREBUILT")
    if prebuilt:
        root = Path(prebuilt).resolve()  # configs written by tests resolve paths from their dir
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


@pytest.fixture(scope="session")
def tiny_fused_bundle(tiny_bundle: BuiltBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's int4 graph with attention fused into GroupQueryAttention (batches
    right-padded), signed with the same key. Prebuilt for the device leg (scripts/test.sh)."""
    prebuilt = os.environ.get("EDGE_TEST_PREBUILT")
    if prebuilt:
        return Path(prebuilt).resolve() / "fused"
    from edge_build import fuse, package

    root = tmp_path_factory.mktemp("fused")
    fuse.run(tiny_bundle.work / "int4", root / "work")
    return package.run(root / "work", root / "bundle", tiny_bundle.key, name="edge-tiny-fused",
                       version="1")


@pytest.fixture(scope="session")
def spec_bundles(tiny_bundle: BuiltBundle, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Path]:
    """The tiny model with a one-layer draft graph (speculative decoding), per cache layout
    ("decomposed", "fused"); see spec_fixtures.py."""
    pytest.importorskip("torch")
    from spec_fixtures import build_spec_bundles

    return build_spec_bundles(tiny_bundle, tmp_path_factory.mktemp("spec"))


@pytest.fixture
def bundle_copy(tiny_bundle: BuiltBundle, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, dst)
    return dst


# A real Mosquitto per test (`broker`, `persistent_broker`, `tls_broker`), shared by every
# folder that talks MQTT: see mqtt_fixtures.py. Each folder's own fixtures are in its
# conftest.py (tests/fleet: the device agent's controller, device root and bundle v2).
from mqtt_fixtures import broker, persistent_broker, pki, tls_broker  # noqa: E402, F401


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a missing component must fail loudly, not skip: with EDGE_TEST_FAIL_ON_SKIP=1
    (scripts/test.sh sets it) any skip fails the run unless its reason names something in
    EDGE_TEST_ALLOWED_SKIPS (the Python 3.10 device leg allows 'torch', by design absent)."""
    if os.environ.get("EDGE_TEST_FAIL_ON_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    allowed = [a for a in os.environ.get("EDGE_TEST_ALLOWED_SKIPS", "").split(",") if a]
    bad = []
    for report in (reporter.stats.get("skipped", []) if reporter else []):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if not any(a in reason for a in allowed):
            bad.append(f"{report.nodeid}: {reason}")
    if bad:
        print("\nskips are failures here (EDGE_TEST_FAIL_ON_SKIP=1):\n  " + "\n  ".join(bad))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
