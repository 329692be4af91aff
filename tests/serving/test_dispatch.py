"""The dispatcher: local / cloud / refuse in one place, one deadline default on one clock.

A real engine loop (LocalWorker) on the scripted generator of the API tests, with an
injected clock; the cloud path itself is exercised end to end in tests/api/test_api_offload.py
(Mosquitto, a cloud worker, the openai client).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from live_server import FakeGenerator

from edge_runtime.errors import OverloadedError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.serving.dispatch import CloudCall, Dispatcher, Drained
from edge_runtime.serving.engine_loop import LocalWorker
from edge_runtime.serving.request import QueueFull, Request
from edge_runtime.serving.scheduler import SchedulerConfig

NOW = 1000.0
CALL = CloudCall(lambda: {"model": "m", "prompt": "hi"}, "completions", stream=False)


@pytest.fixture
def worker() -> Iterator[LocalWorker]:
    w = LocalWorker(lambda: FakeGenerator(reply="hello"),
                    SchedulerConfig(default_deadline_s=7.0),
                    clock=lambda: NOW, measure_rates=False)
    w.start()
    assert w.wait_ready(10)
    yield w
    w.stop()


def request(deadline: float | None) -> Request:
    return Request("r", [1, 2], SamplingParams(max_tokens=8, temperature=0.0),
                   asyncio.get_running_loop(), deadline=deadline)


def test_the_default_deadline_is_the_engine_loops_clock_plus_the_config(
        worker: LocalWorker) -> None:
    d = Dispatcher(worker)
    assert d.deadline(None) == NOW + 7.0 and d.deadline(0.5) == NOW + 0.5

    async def served() -> tuple[float | None, str, str]:
        req = request(None)
        route = d.dispatch(req, CALL)
        text = "".join([c.text async for c in route.chunks])
        return req.deadline, route.served_by, text

    assert asyncio.run(served()) == (NOW + 7.0, "local", "hello")


def test_a_drained_device_without_a_cloud_refuses_with_503(worker: LocalWorker) -> None:
    worker.drained = True

    async def refused() -> OverloadedError:
        with pytest.raises(Drained) as e:
            Dispatcher(worker).dispatch(request(NOW + 5.0), CALL)
        return e.value

    e = asyncio.run(refused())
    assert e.status == 503 and e.retry_after_s == 30.0 and "drained" in str(e)
    assert worker.depth == 0  # never queued


def test_a_full_queue_without_a_cloud_is_refused_with_429(worker: LocalWorker) -> None:
    worker.reconfigure(SchedulerConfig(default_deadline_s=7.0, max_queue=0))

    async def refused() -> OverloadedError:
        with pytest.raises(QueueFull) as e:
            Dispatcher(worker).dispatch(request(None), CALL)
        return e.value

    e = asyncio.run(refused())
    assert e.status == 429 and "the local queue is full (0 waiting)" in str(e)
