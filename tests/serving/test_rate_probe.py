"""The start-up rate probe: which batch sizes it times, and how the rates fill the gaps."""

from __future__ import annotations

from typing import Any

from edge_runtime.bundle.manifest import verify_bundle
from edge_runtime.model.generator import Generator
from edge_runtime.serving.rate_probe import measure_rates
from edge_runtime.serving.rates import Rates
from edge_runtime.signing import trusted_keys


def test_the_probe_times_powers_of_two_and_the_largest_batch(tiny_bundle: Any) -> None:
    """A measured max_batch can be 32: timing every size from 1 cost the start-up (and each
    idle re-probe) hundreds of steps at growing widths."""
    gen = Generator.from_bundle(verify_bundle(tiny_bundle.path, trusted_keys([tiny_bundle.pubkey])),
                                threads=1)
    gen.warmup()
    step_s, prefill_tps = measure_rates(gen, 6, steps=3)
    assert sorted(step_s) == [1, 2, 4, 6]
    assert all(v > 0 for v in step_s.values())
    assert prefill_tps is not None and prefill_tps > 0


def test_unmeasured_sizes_lie_on_the_line_between_measured_ones() -> None:
    rates = Rates()
    rates.seed({1: 0.001, 4: 0.004, 8: 0.006}, None)
    assert abs(rates.engine_step(2) - 0.002) < 1e-12
    assert abs(rates.engine_step(6) - 0.005) < 1e-12
    assert abs(rates.engine_step(16) - 0.012) < 1e-12  # above the largest: scaled up linearly


def test_the_probe_fits_a_short_context_at_a_wide_batch(tiny_bundle: Any) -> None:
    """The tiny model's context is 256 tokens; a measured max_batch of 32 once made the
    probe ask for 322 tokens a sequence, fail, and leave the 0.05 s/step priors in place
    (every request beside a few others then 'took' seconds and was refused)."""
    gen = Generator.from_bundle(verify_bundle(tiny_bundle.path, trusted_keys([tiny_bundle.pubkey])),
                                threads=1)
    assert gen.context_length <= 256
    step_s, _ = measure_rates(gen, 32)
    assert sorted(step_s) == [1, 2, 4, 8, 16, 32]


def test_an_idle_re_probe_gives_way_to_a_request(tiny_bundle: Any) -> None:
    """The engine loop re-measures while idle after sending work away; the request that
    arrives meanwhile must not wait for the whole probe (0.1 s on the demo bundle, 3 s on
    Qwen2-0.5B shapes): asked before each size and step, the probe stops and keeps the
    sizes it finished."""
    gen = Generator.from_bundle(verify_bundle(tiny_bundle.path, trusted_keys([tiny_bundle.pubkey])),
                                threads=1)
    gen.warmup()
    asked = 0

    def arrived() -> bool:  # a request arrives after size 1's check and its 5 steps
        nonlocal asked
        asked += 1
        return asked > 6

    step_s, _ = measure_rates(gen, 6, steps=3, interrupted=arrived)
    assert sorted(step_s) == [1]
    asked = 3  # now it comes during size 1's steps: nothing half-timed is kept
    step_s, _ = measure_rates(gen, 6, steps=3, interrupted=arrived)
    assert step_s == {}
