"""Engines built for fixed shape ranges (a TensorRT plan's max_batch and max_context): the
generator, the batch and the daemon respect them up front instead of failing inside the
engine. The engine here is the real ONNX Runtime one on the tiny bundle, declaring narrower
limits the way TrtEngine does (plan_limits of its profiles)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from edge_runtime.bundle.manifest import Bundle, GraphSpec, verify_bundle
from edge_runtime.engines.load import load_engine
from edge_runtime.engines.protocol import Engine
from edge_runtime.engines.trt_plan import ProfileLimits, plan_limits, profile_shapes
from edge_runtime.errors import ContextLengthError, EngineError
from edge_runtime.model import generator as generator_module
from edge_runtime.model.generator import Generator
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import ModelInfo, Request
from edge_runtime.serving.scheduler import SchedulerConfig
from edge_runtime.signing import load_public_key


class NarrowEngine:
    """A real engine that declares the limits of a plan built for narrower shapes."""

    def __init__(self, inner: Engine, max_batch: int, max_context: int) -> None:
        self.inner, self.max_batch, self.max_context = inner, max_batch, max_context

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def narrow(tiny_bundle, monkeypatch) -> Generator:
    """The tiny bundle's generator on an engine holding 2 sequences of 40 tokens."""
    def load(bundle: Bundle, graph: str = "decoder", backend: str = "auto",
             threads: int | None = None) -> tuple[Engine, GraphSpec]:
        engine, spec = load_engine(bundle, graph, backend, threads)
        return NarrowEngine(engine, max_batch=2, max_context=40), spec

    monkeypatch.setattr(generator_module, "load_engine", load)
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    assert bundle.manifest.generation.context_length > 40
    return Generator.from_bundle(bundle)


def test_plan_limits_read_batch_and_context_off_the_profiles(tiny_bundle):
    graph = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)]).graph(
        "decoder")
    profiles = profile_shapes(graph, ProfileLimits(max_batch=4, max_context=64))
    assert plan_limits(profiles, "past_key_values.0.key") == (4, 64)
    with pytest.raises(EngineError, match="1 prefill and 0 decode profiles"):
        plan_limits(profiles[:1], "past_key_values.0.key")


def test_the_context_is_capped_to_the_engine_and_refused_up_front(narrow):
    assert narrow.context_length == 40
    prompt = narrow.text_prompt("def f(x):\n    return x")
    assert narrow.resolve_max_tokens(len(prompt), None) == 40 - len(prompt)
    with pytest.raises(ContextLengthError, match="context length 40"):
        narrow.resolve_max_tokens(len(prompt), 40)
    out = narrow.generate(prompt, SamplingParams(max_tokens=40 - len(prompt), temperature=0))
    assert len(out.token_ids) <= 40 - len(prompt)


def test_a_batch_wider_than_the_engine_is_refused_naming_both(narrow):
    with pytest.raises(EngineError, match=r"at most 2 sequences.*max_batch is 4.*max_batch=4"):
        narrow.batch(4)
    assert narrow.batch(2).max_batch == 2


def test_chunked_prefill_is_off_on_an_engine_with_fixed_shapes(narrow):
    """A chunk after the first (several tokens over a cache) fits no TensorRT profile."""
    dec = narrow.batch(2, prefill_chunk=4)
    assert dec.prefill_chunk == 0  # off
    prompt = narrow.text_prompt("def f(x):\n    return x")
    assert len(prompt) > 4
    assert dec.add("a", prompt, SamplingParams(max_tokens=2, temperature=0)) != []
    assert dec.prefilling == 0


def test_the_daemon_refuses_to_start_on_a_narrower_engine(narrow):
    worker = LocalWorker(lambda: narrow, SchedulerConfig(max_batch=4), measure_rates=False)
    worker.start()
    worker._thread.join(30)
    assert not worker.ready
    assert isinstance(worker.error, EngineError) and "at most 2" in str(worker.error)


def test_a_swap_to_a_narrower_engine_is_refused_and_the_old_model_serves_on(tiny_bundle,
                                                                           narrow):
    bundle = verify_bundle(tiny_bundle.path, [load_public_key(tiny_bundle.pubkey)])
    wide = Generator(*load_engine(bundle), narrow.tokenizer, bundle.manifest.generation)
    worker = LocalWorker(lambda: wide, SchedulerConfig(max_batch=4), measure_rates=False,
                         model=ModelInfo("m", "1", 0))
    worker.start()
    try:
        assert worker.wait_ready(30)
        with pytest.raises(EngineError, match="at most 2"):
            worker.swap(narrow, ModelInfo("m", "2", 0))
        gen, model = worker.served
        assert gen is wide and model is not None and model.version == "1"

        async def ask(prompt: Sequence[int]) -> str:
            req = Request("a", list(prompt), SamplingParams(max_tokens=4, temperature=0),
                          asyncio.get_running_loop(), generator=gen)
            worker.submit(req)
            return "".join([c.text async for c in req.chunks()])

        assert asyncio.run(ask(wide.text_prompt("x = "))) != ""
    finally:
        worker.stop()
