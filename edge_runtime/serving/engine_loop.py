"""Local serving: the engine loop. One thread decodes a continuous batch; the scheduler says
what joins it, what goes to the cloud and what is refused.

    event loop (a front door)                      engine-loop thread
    ────────────────                               ──────────────────
    LocalWorker.submit(Request) ─▶ scheduler.admit ─▶ LOCAL: queued (deadline order)
                                                    ─▶ review(): late ones → offload/refuse
         ◀── OFFLOAD / REJECT decision              ─▶ next_batch(free slots) → batch.add_many
                                                       (prompts that came together: one run)
                                                    ─▶ batch.step() → a token per sequence
                                                       (+ a chunk of a long prompt's prefill)
    async for c in request.chunks() ◀── loop.call_soon_threadsafe(put_nowait) ◀── each Chunk

Deadlines hold for running requests too: before each decode step, a request whose deadline
has passed, or would pass before that step ends, leaves the batch and gets a
DeadlineExceededError — a 504 `deadline_exceeded` JSON error, or, once an SSE stream has
begun, an error event (`{"error": {..., "code": "deadline_exceeded"}}`) and `[DONE]`, which
OpenAI's clients raise as an APIError. An answer cut short is never passed off as complete
(no `finish_reason: "length"`): the client asked for the whole answer by then. A request
whose deadline passed while it waited is refused the same way before its prefill.

The generator is synchronous and not thread-safe, so exactly one thread drives it and the
event loop never blocks on a decode step. The scheduler and its measured rates are shared
between the two threads under one lock; it does no I/O, so the lock is held for microseconds.

Hot swap (a fleet deploy): `swap(new_generator)` is called with a generator loaded and warmed
up beside the serving one; the engine loop adopts it between two steps, and the old one
finishes what it started (model_swap.py).

How many sequences a batch decodes together (and how many requests may queue) is measured
for each model, at start-up and at a swap, unless the config sets scheduler.max_batch
(capacity.py).

The request and model types that the API and this loop exchange are in request.py.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator

from edge_runtime.errors import DeadlineExceededError, EngineError, OverloadedError
from edge_runtime.model.prefix_cache import PrefixCacheStats
from edge_runtime.model.stream import Chunk
from edge_runtime.serving.capacity import Capacity, capacity_for
from edge_runtime.serving.cloud_view import NO_CLOUD
from edge_runtime.serving.model_swap import ServedModels
from edge_runtime.serving.rate_probe import measure_rates
from edge_runtime.serving.rates import RateSnapshot
from edge_runtime.serving.request import (
    DecodeBatch,
    ModelChanged,
    ModelInfo,
    OffloadRequested,
    QueueFull,
    Request,
    TextGenerator,
    deliver_all,
)
from edge_runtime.serving.scheduler import (
    Action,
    CloudState,
    Decision,
    Job,
    Pressure,
    Scheduler,
    SchedulerConfig,
)

__all__ = ["LocalWorker"]

log = logging.getLogger(__name__)

ENGINE_ERROR_WINDOW_S = 60.0
REVIEW_INTERVAL_S = 0.02
"""How often queued jobs are re-decided (scheduler.review) while the engine is busy."""
RATE_PROBE_INTERVAL_S = 1.0
"""Least time between two rate probes of an idle engine that is sending work away."""


class LocalWorker:
    """Loads the model, then runs the engine loop on one thread."""

    def __init__(
        self,
        load: Callable[[], TextGenerator],
        config: SchedulerConfig | None = None,
        cloud: Callable[[], CloudState] | None = None,
        pressure: Callable[[], Pressure] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        measure_rates: bool = True,
        model: ModelInfo | None = None,
        reprobe_idle: bool = True,
        freeze_heap: bool = False,
    ) -> None:
        """`measure_rates`: time the engine at start-up and when idle (see _seed_rates); off
        only for scripted test generators whose timing is the test's own. `model`: what the
        API reports about the loaded model (a swap replaces it with the generator).
        `reprobe_idle`: measure again when idle after sending work away (off for the cloud
        worker, whose refusals are final: it has no other path whose choice the measured
        rates decide). `clock`: the deadlines' clock (the cloud worker's is the wall clock
        its requests' deadlines are written in). `freeze_heap`: once the model is warm,
        take every object alive out of the cyclic garbage collector's sight (`gc.freeze`),
        for a process that is this daemon (the CLI's serve), not a test run: see
        _freeze_heap."""
        self._load = load
        self._freeze_heap = freeze_heap
        self._measure_rates = measure_rates
        self._reprobe = measure_rates and reprobe_idle
        self.config = config or SchedulerConfig()
        self.scheduler = Scheduler(self.config)
        self._cloud = cloud or (lambda: NO_CLOUD)
        self._pressure = pressure or Pressure
        self._on_failure = on_failure
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._requests: dict[Hashable, Request] = {}
        self._stopping = False
        self._engine_errors: list[float] = []
        self._thread = threading.Thread(target=self._run, name="edge-runtime-engine", daemon=True)
        self._models = ServedModels(model)
        self._draining = self._models.draining  # the same list: empty once a swap is over
        self.error: BaseException | None = None
        """Why loading failed, if it did."""
        self._ready = threading.Event()
        self._sent_away = False
        """A request was offloaded or refused since the last rate probe."""
        self._probed_at = 0.0
        self._reviewed_at = -1.0
        self.peak_batch = 0
        self._tally: dict[Hashable, list[float]] = {}
        """Admitted request → [perf_counter at submit, seconds the rates predicted for the
        prefills and steps served since, the estimate it was admitted with (safety
        included), other requests beside it so far, 1.0 once a measurement disturbed it]:
        what it cost beyond the rates, when it completes (Rates.observe_request)."""
        self._measuring = 0
        """Measurements running beside the engine loop (a swap's capacity and rate probes
        of the new model): they take the CPU and the GIL from the requests being served,
        whose steps, cycles and totals then say nothing about serving. Learned from, a
        swap's probes made steps beside them "cost" tens of milliseconds, and new requests
        were refused with estimates of 30 s (tests/fleet/test_fleet_serving.py)."""
        self._cycle_engine_s = 0.0
        """Seconds of this engine-loop cycle spent in the engine (add() and step() calls)."""
        self._cycle_rows = 0
        """The most sequences one decode step has served so far."""
        self.prefilling = 0
        """Long prompts being prefilled a chunk per step (set by the engine loop after each
        step; read by /metrics)."""
        self.drained = False
        """Set by the fleet's drain: the dispatcher (dispatch.py) admits no new request here;
        what is queued or running finishes. The engine loop itself does not look at it."""

    # -- control (event loop / main thread) ----------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse the queued requests, let the running ones finish, join the thread."""
        if not self._thread.is_alive():
            return
        self._refuse_queued()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _refuse_queued(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self.scheduler.next_batch(len(self.scheduler.queue)):
                self.scheduler.finished(job.key)
                req = self._requests.pop(job.key, None)
                if req is not None:
                    req.deliver(OverloadedError("the server is shutting down", 1.0, status=503))
            self._wake.notify_all()

    @property
    def generator(self) -> TextGenerator | None:
        """The serving generator; the API tokenizes prompts with it."""
        return self._models.served[0]

    @property
    def model(self) -> ModelInfo | None:
        return self._models.served[1]

    @model.setter
    def model(self, info: ModelInfo) -> None:
        self._models.served = (self._models.served[0], info)

    @property
    def served(self) -> tuple[TextGenerator | None, ModelInfo | None]:
        """(generator, model) read at once: a swap never shows half of each."""
        return self._models.served

    def swap(self, generator: TextGenerator, model: ModelInfo | None = None) -> None:
        """Serve `generator` (loaded and warmed up by the caller) for new requests; return
        once the engine loop has adopted it. Requests already queued or running finish on
        the generator they were tokenized with. A generator whose engine cannot decode
        `max_batch` sequences together is refused here (EngineError), before any change.
        Its max_batch is measured here (unless configured), while the old model still
        serves and holds its memory: on a busy device the choice errs small."""
        _use_prefix_cache(generator, self.config.prefix_cache_bytes)
        with self._disturbing():
            capacity = capacity_for(generator, self.config, self._measure_rates)
            batch = generator.batch(capacity.max_batch, self.config.prefill_chunk)
            if self._measure_rates:
                try:  # the new model's own speed, measured before it takes traffic
                    self._seed_rates(generator, batch.max_batch)
                except Exception as e:
                    log.warning("could not measure the new model's service rates: %s", e)
        with self._lock:
            if self._stopping:
                raise EngineError("the server is shutting down; not swapping the model")
            done = self._models.offer(generator, model, batch, capacity)
            self._wake.notify_all()
        while not done.wait(0.05):
            if self.error is not None or (self._thread.ident and not self._thread.is_alive()):
                raise EngineError("the engine loop is not running; cannot swap the model")

    @contextlib.contextmanager
    def _disturbing(self) -> Iterator[None]:
        """Around a measurement beside the engine loop: no request served meanwhile is
        learned from (see _measuring)."""
        with self._lock:
            self._measuring += 1
            for tally in self._tally.values():
                tally[4] = 1.0
        try:
            yield
        finally:
            with self._lock:
                self._measuring -= 1

    def reconfigure(self, config: SchedulerConfig) -> None:
        """Scheduler settings for the decisions from now on (a fleet set-config). max_batch
        sizes the decode batches already built: changing it takes a restart (the caller,
        live_config.py, keeps it)."""
        assert config.max_batch == self.config.max_batch, "max_batch changes need a restart"
        with self._lock:
            self.config = self.scheduler.config = config

    @property
    def capacity(self) -> Capacity | None:
        """The serving model's max_batch and queue bound, and why (read by /metrics)."""
        return self._models.capacity

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def prefix_cache(self) -> PrefixCacheStats | None:
        """The served model's prefix cache counters (read by /metrics); None without one."""
        cache = getattr(self.generator, "prefix_cache", None)
        return cache.stats() if cache is not None else None

    def estimates(self) -> RateSnapshot:
        """The scheduler's measured rates, read at once (for /metrics)."""
        with self._lock:
            return self.scheduler.rates.snapshot()

    @property
    def depth(self) -> int:
        """Requests waiting plus those being generated."""
        return len(self.scheduler.queue) + len(self.scheduler.running)

    def pressure(self) -> Pressure:
        now = self._clock()
        recent = [t for t in self._engine_errors if now - t < ENGINE_ERROR_WINDOW_S]
        self._engine_errors = recent
        base = self._pressure()
        return Pressure(
            engine_errors=base.engine_errors + len(recent), memory=base.memory, thermal=base.thermal
        )

    def deadline(self, budget_s: float | None = None) -> float:
        """The deadline of a request arriving now, on this loop's clock: `budget_s` from
        now, else scheduler.default_deadline_s (the one place that default is applied)."""
        return self._clock() + (self.config.default_deadline_s if budget_s is None else budget_s)

    def submit(self, request: Request) -> Decision:
        """Admit `request`: LOCAL queues it; OFFLOAD is returned for the caller to carry out
        (dispatch.Dispatcher does); REJECT raises OverloadedError (429, or 503 when no path
        can serve it)."""
        now = self._clock()
        if request.deadline is None:
            request.deadline = self.deadline()
        job = Job(
            key=request.id,
            arrival=now,
            deadline=request.deadline,
            prompt_tokens=len(request.prompt_ids),
            max_tokens=request.params.max_tokens,
        )
        with self._lock:
            if self._stopping:
                raise OverloadedError("the server is shutting down", 1.0, status=503)
            gen = request.generator
            if gen is not None and not self._models.knows(gen):
                raise ModelChanged()
            decision = self.scheduler.admit(job, now, self._cloud(), self.pressure())
            if decision.action is Action.LOCAL:
                self._requests[job.key] = request
                estimate = (decision.estimated_finish or now) - now
                for tally in self._tally.values():  # one more request beside each
                    tally[3] += 1
                self._tally[job.key] = [time.perf_counter(), 0.0, estimate, len(self._tally),
                                        float(self._measuring > 0)]
                self._wake.notify()
        if decision.action is not Action.LOCAL and self._reprobe:
            self._sent_away = True  # the engine loop re-measures the rates when it is idle
        if decision.action is Action.REJECT:
            refusal = QueueFull if decision.queue_full else OverloadedError
            raise refusal(decision.reason, decision.retry_after_s, decision.status,
                          decision.should_retry)
        return decision

    # -- engine-loop thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            gen = self._load()
            _use_prefix_cache(gen, self.config.prefix_cache_bytes)
            gen.warmup()
            capacity = capacity_for(gen, self.config, self._measure_rates)
            # refuses a max_batch the engine lacks
            batch = gen.batch(capacity.max_batch, self.config.prefill_chunk)
            self._models.capacity = capacity
            self._limit_to(batch)
            if self._measure_rates:
                try:
                    self._seed_rates(gen, batch.max_batch)
                except Exception as e:  # e.g. a graph that cannot batch: keep the priors
                    log.warning("could not measure service rates at start-up: %s", e)
        except BaseException as e:
            log.error("loading the model failed: %s", e)
            self.error = e
            if self._on_failure is not None:
                self._on_failure(e)
            self._refuse_queued()
            return
        with self._lock:
            self._models.served = (gen, self._models.served[1])
        if self._freeze_heap:
            _freeze_heap()
        self._ready.set()
        while True:
            cycle_start = time.perf_counter()
            self._cycle_engine_s, self._cycle_rows = 0.0, 0
            with self._lock:
                if self._models.pending is not None:
                    gen, batch = self._models.adopt(batch)
                    self._limit_to(batch, locked=True)
                if self._draining:
                    self._models.release(
                        lambda g: any(r.generator is g for r in self._requests.values()))
                starting = self._admit_work(batch)
                if starting is None:
                    break
                draining = self._models.busy_batches()
                if not starting and not batch.active and not draining:
                    if not (self._sent_away and self._probe_due()):
                        self._wake.wait(timeout=0.05)  # bounded: review() must still run
                        continue
                    self._sent_away = False
                    probe = True
                else:
                    probe = False
            if probe:  # idle, yet work went elsewhere: the rates may be stale
                try:
                    self._seed_rates(gen, batch.max_batch, idle=True)
                except Exception as e:
                    log.warning("could not re-measure service rates: %s", e)
                continue
            if starting:
                self._start(batch, [job.key for job in starting])
            if batch.active:
                self._step(batch)
            for old in draining:  # swapped-out models finish what they started
                self._step(old)
            if self._cycle_rows and not draining and not self._measuring:
                # The cycle beyond the engine's own work: the serving path's per-token cost.
                overhead = time.perf_counter() - cycle_start - self._cycle_engine_s
                with self._lock:
                    self.scheduler.rates.observe_overhead(self._cycle_rows, overhead)

    def _limit_to(self, batch: DecodeBatch, locked: bool = False) -> None:
        """The scheduler plans with what the batch runs, not with what the config asked
        (one source of truth for max_batch and prefill_chunk), and the serving model's
        queue bound."""
        cap = self._models.capacity
        bound = cap.max_queue if cap is not None else None
        if locked:
            self.scheduler.limit_to(batch.max_batch, batch.prefill_chunk, bound)
            return
        with self._lock:
            self.scheduler.limit_to(batch.max_batch, batch.prefill_chunk, bound)

    def _seed_rates(self, gen: TextGenerator, max_batch: int, idle: bool = False) -> None:
        """Measure the engine's step and prefill times (rate_probe.py; engine thread) and
        give them to the scheduler. `idle`: a re-probe while nothing runs, which gives way
        to the first request that arrives (it blocked the engine loop for its whole 0.1 s
        on the demo bundle, 3 s on Qwen2-0.5B shapes: a request behind it missed its
        deadline in bench_deadlines)."""
        step_s, prefill_tps = measure_rates(
            gen, max_batch, interrupted=(lambda: bool(self.scheduler.queue)) if idle else None)
        if not step_s and prefill_tps is None:
            self._probed_at = time.monotonic()
            return
        with self._lock:
            rates = self.scheduler.rates
            rates.seed(step_s, prefill_tps)
            rates.expire()  # an old per-request cost must not refuse requests for ever
        self._probed_at = time.monotonic()
        log.info("measured step times %s s, prefill %.0f tokens/s",
                 {b: round(v, 4) for b, v in sorted(step_s.items())}, rates.prefill_tokens_per_s)

    def _probe_due(self) -> bool:
        return time.monotonic() - self._probed_at >= RATE_PROBE_INTERVAL_S

    def _admit_work(self, batch: DecodeBatch) -> list[Job] | None:
        """Under the lock: re-decide late queued jobs, drop cancelled ones, take new ones.
        None when the loop should end."""
        if self._stopping and not batch.active and not self.scheduler.queue and not self._draining:
            return None
        now = self._clock()
        # review() simulates the queue ahead of every queued job (quadratic in its length):
        # at most every REVIEW_INTERVAL_S, not before every decode step.
        real = time.monotonic()  # not self._clock: a test's frozen clock must not stop it
        due = real - self._reviewed_at >= REVIEW_INTERVAL_S
        reviewed = self.scheduler.review(now, self._cloud(), self.pressure()) if due else []
        if due:
            self._reviewed_at = real
        for job, decision in reviewed:
            req = self._requests.pop(job.key, None)
            if req is None:
                continue
            self._tally.pop(job.key, None)
            if decision.action is Action.OFFLOAD:
                req.deliver(OffloadRequested(decision))
            else:
                req.deliver(OverloadedError(decision.reason, decision.retry_after_s,
                                            decision.status, decision.should_retry))
        for job in list(self.scheduler.queue):
            if self._requests[job.key].cancelled:
                self.scheduler.cancel(job.key)
                self._requests.pop(job.key, None)
                self._tally.pop(job.key, None)
        running = batch.active + sum(b.active for _, b in self._draining)
        return self.scheduler.next_batch(self.scheduler.max_batch - running, now)

    def _start(self, batch: DecodeBatch, keys: list[Hashable]) -> None:
        """Prefill the jobs the scheduler let start, together where the engine can (one run
        for prompts that arrived at once; BatchDecoder.add_many); a request the engine
        cannot run fails alone."""
        by_batch: dict[int, tuple[DecodeBatch, list[Hashable]]] = {}
        for key in keys:
            req = self._requests[key]
            target = batch
            if req.generator is not None and req.generator is not self.generator:
                # Tokenized by a swapped-out model: it runs there (kept alive for it).
                target = self._models.batch_of(req.generator)
            if req.cancelled:
                self._finish(key)
                continue
            if req.deadline is not None and self._clock() >= req.deadline:
                late = self._clock() - req.deadline
                log.info("request %s reached its deadline before its prefill", key)
                req.deliver(DeadlineExceededError(
                    f"the request's deadline passed while it waited ({late:.2f}s ago): not "
                    "started"))
                self._finish(key)
                continue
            req.started = self._clock()
            by_batch.setdefault(id(target), (target, []))[1].append(key)
        for target, ks in by_batch.values():
            self._add_together(target, ks)
        self.prefilling = batch.prefilling

    def _add_together(self, batch: DecodeBatch, keys: list[Hashable]) -> None:
        t = time.perf_counter()
        try:
            got = batch.add_many([(k, self._requests[k].prompt_ids, self._requests[k].params)
                                  for k in keys])
        except Exception as e:  # refused before any work (cannot happen: the scheduler
            if len(keys) > 1:   # sized the batch): one by one, so that only a bad one fails
                for key in keys:
                    self._add_together(batch, [key])
                return
            got = {keys[0]: e}
        self._cycle_engine_s += time.perf_counter() - t
        with self._lock:
            # Several prompts in one run cost less than each alone: the rates keep what one
            # alone costs (the scheduler's estimate for a newcomer), learned from those.
            if not self._measuring and not batch.prefill_batched:
                self.scheduler.rates.observe_call(0, 0.0, batch.prefill_work)
            self._accrue(self.scheduler.rates.prefill_time(batch.prefill_work[0]))
        out: list[tuple[Request, Chunk | BaseException]] = []
        for key in keys:
            chunks = got[key]
            if isinstance(chunks, Exception):  # a request the engine cannot run fails alone
                log.error("request %s failed in prefill: %s", key, chunks,
                          exc_info=chunks)
                self._engine_errors.append(self._clock())
                self._requests[key].deliver(chunks)
                self._finish(key)
                continue
            self._deliver(key, chunks, out)
        deliver_all(out)

    def _step(self, batch: DecodeBatch) -> None:
        for key in batch.keys:
            if self._requests[key].cancelled:
                log.info("request %s cancelled by its client", key)
                batch.remove(key)
                self._finish(key)
        self._expire(batch)
        size = batch.active - batch.prefilling  # rows of the decode step
        if not batch.active:
            return
        self.peak_batch = max(self.peak_batch, batch.active)
        t = time.perf_counter()
        try:
            results = batch.step()
        except Exception as e:  # an engine failure fails the batch's requests, not the daemon
            log.exception("decode step failed for %d sequences", batch.active)
            self._engine_errors.append(self._clock())
            for key in batch.keys:
                batch.remove(key)
                self._requests[key].deliver(e)
                self._finish(key)
            return
        self.prefilling = batch.prefilling
        took = time.perf_counter() - t
        # A batch of one may decode speculatively (model/speculative.py): one call, several
        # tokens. The rates are per token, so such a call counts as that many steps (counted
        # as one, a 3-token round made the batch-1 step 3x too slow, and every request that
        # would run alone was refused: bench_deadlines' single requests, 0 of 16 admitted).
        per_row = {key: sum(len(c.token_ids) for c in chunks) for key, chunks in results.items()}
        tokens = max(per_row.values(), default=1) if size == 1 else 1
        self._cycle_engine_s += took
        self._cycle_rows += size * tokens
        with self._lock:
            rates = self.scheduler.rates
            # The engine's own step is learned from steps with no other request in the daemon
            # (queued, deferred, or in another batch): beside them a step also waits for the
            # GIL while the event loop serves them, which per_concurrent_s already charges.
            # Learned from every step, the batch-1 step rose from 0.14 to 1.2 ms through the
            # tails of bursts (deferred requests decoding alone while the others' answers
            # were written), and quiet single requests were then refused for it.
            quiet = len(self._tally) <= size
            if not self._measuring and quiet:  # a probe beside it took the CPU, too
                prefill_s = batch.prefill_work[1]
                rates.observe_call(size, prefill_s + (took - prefill_s) / max(1, tokens),
                                   batch.prefill_work)
            self._accrue(tokens * rates.step_time(size)
                         + rates.prefill_time(batch.prefill_work[0]))
            for key in results:
                self.scheduler.progressed(key, max(1, per_row[key]))
        out: list[tuple[Request, Chunk | BaseException]] = []
        for key, chunks in results.items():
            self._deliver(key, chunks, out)
        deliver_all(out)

    def _expire(self, batch: DecodeBatch) -> None:
        """End the running requests that the next decode step cannot serve in time."""
        now = self._clock()
        with self._lock:
            rates = self.scheduler.rates
            step = rates.step_time(max(1, batch.active - batch.prefilling))
            if batch.prefilling:  # the next step carries a prefill chunk too
                step += rates.prefill_time(batch.prefill_chunk)
        what = "a decode step" + (" with a prefill chunk" if batch.prefilling else "")
        for key in batch.keys:
            req = self._requests[key]
            if req.deadline is not None and now + step > req.deadline:
                tally = self._tally.get(key)
                with self._lock:
                    running = self.scheduler.running.get(key)
                left = running.remaining if running is not None else -1
                # What an operator needs to tell a wrong estimate from a changed load: the
                # promise, the company it was made in, and how far the request got.
                log.info("request %s reached its deadline during generation (admitted with an "
                         "estimate of %.3fs; %d other request(s) in the daemon with it "
                         "since; %.3fs since; waited "
                         "%.3fs to start; %d of %d tokens generated; %d rows in the batch)",
                         key, tally[2] if tally else -1, int(tally[3]) if tally else -1,
                         time.perf_counter() - tally[0] if tally else -1, req.queue_wait_s,
                         req.params.max_tokens - left, req.params.max_tokens, batch.active)
                batch.remove(key)
                req.deliver(DeadlineExceededError(
                    f"the request's deadline came during generation ({req.deadline - now:.3f}s "
                    f"left, {what} takes ~{step:.3f}s): generation stopped"
                ))
                self._finish(key)

    def _deliver(self, key: Hashable, chunks: list[Chunk],
                 out: list[tuple[Request, Chunk | BaseException]]) -> None:
        """Add `key`'s chunks for its client to `out`, which the caller hands over with one
        wake-up of the event loop (request.deliver_all)."""
        req = self._requests[key]
        for chunk in chunks:
            req.generated += len(chunk.token_ids)
            if not req.stream and chunk.finish_reason is None:
                req.held.append(chunk)  # the whole answer goes at once, with the last chunk
                continue
            out += [(req, item) for item in (*req.held, chunk)]
            req.held.clear()
            if chunk.finish_reason is not None:
                with self._lock:
                    tally = self._tally.get(key)
                    if tally is not None and not tally[4]:  # cost beyond the rates' prediction
                        actual = time.perf_counter() - tally[0]
                        self.scheduler.rates.observe_request(actual, tally[1], int(tally[3]))
                        log.debug("request %s took %.4fs, admitted with an estimate of %.4fs "
                                  "(rates predicted %.4fs for its prefills and steps)", key,
                                  actual, tally[2], tally[1])
                self._finish(key)

    def _accrue(self, seconds: float) -> None:
        """Under the lock: the engine did `seconds` of predicted work (a prefill or a step)
        that every admitted request, queued or running, waited through."""
        for tally in self._tally.values():
            tally[1] += seconds

    def _finish(self, key: Hashable) -> None:
        with self._lock:
            self.scheduler.finished(key)
            self._requests.pop(key, None)
            self._tally.pop(key, None)


def _freeze_heap() -> None:
    """Move every object alive now — the imported libraries, the app, the model and its
    tokenizer: ~75,000 on the demo bundle — into the permanent generation, out of the cyclic
    garbage collector's sight. Each full collection walked them all, 10-20 ms with the GIL
    held: a stall of the engine loop and of every request in flight, at moments nobody
    chose (single requests in bench_deadlines made 1-3 of 8 tokens in 6-7 ms against 0.2 ms
    a token, and were cut off). What requests allocate is still collected; what was frozen
    is still freed when its last reference goes (reference counting), only its cycles stay
    (a swapped-out model's are few, and swaps are rare)."""
    gc.collect()  # garbage of the start-up is not kept for ever
    gc.freeze()
    log.debug("gc.freeze: %d objects out of the collector's sight", gc.get_freeze_count())


def _use_prefix_cache(gen: TextGenerator, budget_bytes: int) -> None:
    """Give a loaded model its prefix cache (model/prefix_cache.py)."""
    use = getattr(gen, "use_prefix_cache", None)  # a scripted test generator has no KV cache
    if use is not None:
        use(budget_bytes)
