"""Engine caches live outside the bundle: a device that cached an engine for its bundle must
still verify that bundle at its next start (before, ONNX Runtime's TensorRT execution
provider wrote `model/.trt-cache` inside it, and the next verification refused the bundle:
"file is not listed in the manifest").

The TensorRT execution provider does not run here; the engine file is written where the
provider would write it, into the directory OrtEngine hands it (the same code path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_fixtures import make_bundle

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.engines.ort import OrtEngine
from edge_runtime.engines.trt_cache import (
    CACHE_ENV,
    RUNTIME_CACHE_ENV,
    default_cache_dir,
    ort_trt_cache_dir,
    runtime_cache_dir,
)
from edge_runtime.errors import ConfigError
from edge_runtime.signing import generate_keypair, load_public_key

TRT_THEN_CPU = ["TensorrtExecutionProvider", "CPUExecutionProvider"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv(RUNTIME_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return tmp_path / "cache"


def test_a_bundle_verifies_after_an_engine_was_cached_for_it(bundle_copy, tiny_bundle, cache):
    keys = [load_public_key(tiny_bundle.pubkey)]
    bundle = verify_bundle(bundle_copy, keys)
    before = _snapshot(bundle_copy)
    spec = bundle.graph()
    engine_dir = ort_trt_cache_dir(bundle, spec)  # what load_engine hands OrtEngine
    assert cache in engine_dir.parents and bundle_copy.resolve() not in engine_dir.parents
    # The provider is asked for (this ONNX Runtime lacks it and runs on CPU); OrtEngine
    # creates the directory it names in the provider's options.
    OrtEngine(bundle.path(spec.file), threads=1, providers=TRT_THEN_CPU, cache_dir=engine_dir)
    assert engine_dir.is_dir() and oct(engine_dir.stat().st_mode & 0o777) == "0o700"
    (engine_dir / "TensorrtExecutionProvider_TRTKernel_graph_main_0_0_sm87.engine").write_bytes(
        b"engine" * 100)
    (engine_dir / "TensorrtExecutionProvider_cache_sm87.timing").write_bytes(b"timing")
    # A graph opened by path (no bundle): its cache is under the runtime cache too.
    OrtEngine(bundle.path(spec.file), threads=1, providers=TRT_THEN_CPU)
    assert not (bundle_copy / "model" / ".trt-cache").exists()
    assert _snapshot(bundle_copy) == before
    verify_bundle(bundle_copy, keys)  # the next start: still valid


def test_two_bundles_never_share_an_engine_cache(bundle_copy, tiny_bundle, cache, tmp_path):
    keys = [load_public_key(tiny_bundle.pubkey)]
    tiny = verify_bundle(bundle_copy, keys)
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    others = [verify_bundle(make_bundle(tmp_path / f"syn{v}", tmp_path / "k.key", v, 1000),
                            [load_public_key(tmp_path / "k.pub")]) for v in ("1", "2")]
    dirs = {ort_trt_cache_dir(b, b.graph()) for b in (tiny, *others)}
    assert len(dirs) == 3  # a new version at the same graph path gets a fresh cache
    # The same bundle (same signed manifest) keeps its cache across restarts.
    assert ort_trt_cache_dir(tiny, tiny.graph()) == ort_trt_cache_dir(
        verify_bundle(bundle_copy, keys), tiny.graph())


def test_a_cache_inside_the_bundle_is_refused(bundle_copy, tiny_bundle, monkeypatch):
    bundle = verify_bundle(bundle_copy, [load_public_key(tiny_bundle.pubkey)])
    monkeypatch.setenv(RUNTIME_CACHE_ENV, str(bundle_copy / "model"))
    with pytest.raises(ConfigError, match=f"inside the bundle.*{RUNTIME_CACHE_ENV}"):
        ort_trt_cache_dir(bundle, bundle.graph())


def test_the_plan_cache_is_under_the_runtime_cache(cache, monkeypatch, tmp_path):
    assert runtime_cache_dir() == cache and default_cache_dir() == cache / "trt"
    monkeypatch.delenv(RUNTIME_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "edge-runtime" / "trt"
