"""The API folder's fixture: a real uvicorn server per test module, twice over (params):
a scripted generator, and the tiny bundle's real model and tokenizer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import FakeGenerator, serve_in_thread, wait_until

from edge_runtime.api.app import create_app
from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo
from edge_runtime.signing import trusted_keys


@pytest.fixture(scope="module", params=["fake", "bundle"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(base URL, model name)."""
    if request.param == "fake":
        model = ModelInfo(name="fake-model", version="1", created=0)
        worker = LocalWorker(FakeGenerator, measure_rates=False)
    else:
        tiny = request.getfixturevalue("tiny_bundle")
        bundle = verify_bundle(tiny.path, trusted_keys([tiny.pubkey]))
        model = ModelInfo.from_bundle(bundle)
        worker = LocalWorker(lambda: Generator.from_bundle(bundle, threads=1))
    with serve_in_thread(create_app(worker, model)) as url:
        wait_until(lambda: worker.ready, timeout=60)
        yield url, model.name
