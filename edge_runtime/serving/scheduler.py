"""The overload scheduler: a pure decision component (no I/O, no threads, no wall clock).

For every request it answers one question — serve it here, send it to the cloud, or refuse
it now — so that requests served locally keep their deadline instead of queueing without
bound (what a first-come-first-served server like Ollama does under load).

    arrival ─▶ admit(req, now) ──local──▶ queue ─▶ next_batch(now, free) ─▶ engine loop
                       │                    │
                       │                    └─ review(now): a queued request that can no
                       │                       longer make its deadline is offloaded or refused
                       ├──offload──▶ cloud (when the cloud is up and the remaining deadline
                       │             exceeds its measured p99 round trip)
                       └──reject───▶ 429 + Retry-After (overloaded) or 503 (cloud down too)

The wait estimate is an event simulation of the decode batch from measured rates: prefill
tokens/s, and the time of one decode step at each batch size (both updated online by the
engine loop through `Rates`). Everything it needs comes in as arguments — the clock
included — so every decision is unit-tested exactly with hand-built rates.

Two rules keep the promise of a LOCAL decision:
- A newcomer is served locally only if it also leaves every job already admitted on time:
  its prefill pauses their decoding and its row slows every later step (a bigger batch);
  a prompt prefilled in chunks also holds its row through one decode step per chunk.
  Checking only the newcomer's own finish let a long request admitted into an idle batch be
  overtaken by the newcomers that filled the batch after it (tests: the "1x" case).
  A newcomer that would do that harm but has time to spare is not refused: it is deferred,
  admitted to start once the requests it would delay have finished (`Job.waits_for`), when
  its own estimate from then still meets its deadline. Refusing it was the only other
  answer, and 11 of 14 refusals in bench_deadlines' runs were of requests that would have
  finished in time had they waited (1 s budgets, 21 ms alone, behind requests due in 0.1 s).
- The engine loop ends a running request at its deadline (engine_loop.py), so a running job
  occupies its slot until its last token or its deadline, whichever comes first.

The cloud's p99 round trip comes per generation length (`CloudState.p99_for`): a request for
16 tokens is not sent to the cloud on the strength of one p99 taken over 512-token answers.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from edge_runtime.errors import ConfigError
from edge_runtime.model.prefix_cache import DEFAULT_BUDGET_BYTES
from edge_runtime.serving.rates import Rates

__all__ = ["Action", "CloudState", "Decision", "Job", "Pressure", "Rates", "Scheduler",
           "SchedulerConfig", "prefill_waits"]

DEFER_ROUNDS = 3
"""Rounds of widening the set of admitted requests a newcomer waits for (Scheduler.admit),
the last one all of them."""

UNMEASURED_MAX_BATCH = 4
"""max_batch until a model is loaded and measured, or where measuring failed."""
QUEUE_WAVES = 16
"""A queue bound of this many full batches (max_batch 4 → 64): a request behind more waves
waits longer than any useful deadline, and each queued one is simulated at every review."""


class Action(enum.Enum):
    LOCAL = "local"
    OFFLOAD = "offload"
    REJECT = "reject"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    """Why, in words an operator can act on (also the error message of a rejection)."""
    status: int = 200
    """For REJECT: 429 (overloaded, retry later) or 503 (no path can serve it)."""
    retry_after_s: float = 0.0
    """For REJECT: when local capacity for this request returns (a batch slot free and
    nobody queued ahead), from the queue and the measured rates."""
    should_retry: bool | None = None
    """For REJECT: False when retrying cannot help the caller (its request cannot be done
    within its own budget even alone, or not before its deadline once capacity returns);
    None: the client's own policy decides."""
    estimated_finish: float | None = None
    queue_full: bool = False
    """For REJECT: the queue had no room (max_queue), whatever this request asked; a front
    door that tells "busy" from "too late" (the cloud worker) reads it."""


@dataclass(frozen=True)
class SchedulerConfig:
    """`[scheduler]` in the config file."""

    max_batch: int | None = None
    """Sequences decoded together (continuous batching). Unset: chosen when a model is
    loaded from its measured decode steps and the memory left (serving/capacity.py)."""
    max_queue: int | None = None
    """Requests waiting for a batch slot; beyond it, offload or reject. Unset: 16 x the
    batch the engine runs."""
    default_deadline_s: float = 30.0
    """Deadline of a request that does not send `x-request-deadline-ms`."""
    safety: float = 1.2
    """Local estimates are multiplied by this before comparing with a deadline."""
    offload_enabled: bool = True
    """Offload to the cloud when [offload] names a broker (off: reject instead)."""
    cloud_p99_prior_s: float = 2.0
    """The cloud round trip assumed before any offload has been measured."""
    engine_error_limit: int = 3
    """Recent engine errors that make the scheduler stop serving locally."""
    prefill_chunk: int = 128
    """Prompts longer than this are prefilled this many tokens per decode step, so a long
    prompt delays the running streams by one chunk at a time, not by its whole prefill
    (0: whole prompts at once; TensorRT plans always prefill whole prompts)."""
    step_latency_target_ms: float = 100.0
    """For a measured max_batch: a decode step, which is each stream's time per token, stays
    within this at the chosen batch (100 ms: 10 tokens/s per stream, twice reading speed).
    Applied when a model is loaded or swapped in (serving/capacity.py). The key's name says
    step, not token: config keys with "token" in them are redacted as secrets."""
    memory_headroom_mb: int = 1024
    """For a measured max_batch: memory left to the OS and other processes beside the
    model's weights and its KV caches at full context."""
    prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES
    """Memory for the KV caches of prompt prefixes (system prompt, chat history) that later
    prompts starting with the same tokens reuse instead of prefilling them again; least
    recently used evicted first (model/prefix_cache.py; 0: off). Applied when a model is
    loaded or swapped in."""

    def __post_init__(self) -> None:
        checks = [
            (self.max_batch is None or self.max_batch >= 1,
             f"scheduler.max_batch must be >= 1, got {self.max_batch} (or unset: measured)"),
            (self.max_queue is None or self.max_queue >= 0,
             f"scheduler.max_queue must be >= 0, got {self.max_queue} (or unset)"),
            (self.step_latency_target_ms > 0,
             f"scheduler.step_latency_target_ms must be > 0, got {self.step_latency_target_ms}"),
            (self.memory_headroom_mb >= 0,
             f"scheduler.memory_headroom_mb must be >= 0, got {self.memory_headroom_mb}"),
            (
                self.default_deadline_s > 0,
                f"scheduler.default_deadline_s must be > 0, got {self.default_deadline_s}",
            ),
            (self.safety >= 1.0, f"scheduler.safety must be >= 1, got {self.safety}"),
            (
                self.prefill_chunk >= 0,
                f"scheduler.prefill_chunk must be >= 0 (0: off), got {self.prefill_chunk}",
            ),
            (
                self.prefix_cache_bytes >= 0,
                f"scheduler.prefix_cache_bytes must be >= 0 (0: off), got "
                f"{self.prefix_cache_bytes}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class Job:
    """What the scheduler knows of a request."""

    key: Hashable
    arrival: float
    deadline: float
    """Absolute time (same clock as `now`) by which the response must be complete."""
    prompt_tokens: int
    max_tokens: int
    waits_for: frozenset[Hashable] = frozenset()
    """A deferred job: admitted requests it starts after, since joining the batch at once
    would push them past their deadlines (Scheduler.admit)."""
    waits_until: float = -math.inf
    """A deferred job starts by this time whatever (the latest deadline of `waits_for`: the
    engine loop ends a request at its deadline, so waiting longer is for nothing)."""

    def may_start(self, now: float, present: set[Hashable]) -> bool:
        """Whether it may join the batch at `now`, given the keys still running or queued."""
        return not self.waits_for or now >= self.waits_until or not self.waits_for & present


@dataclass(frozen=True)
class CloudState:
    available: bool
    """Configured and its circuit breaker is closed (or half-open with a probe free)."""
    p99_s: float
    """p99 round trip of an offloaded request (publish → last chunk) when nothing closer to
    the request's generation length is known: the prior, or all samples together."""
    configured: bool = True
    p99_by_tokens: tuple[tuple[int, float], ...] = ()
    """(max_tokens up to, p99 s) per generation-length bucket, ascending (the offload client)."""

    def p99_for(self, max_tokens: int) -> float:
        """The p99 round trip for a request of `max_tokens`: its bucket's, else the next
        longer bucket's (pessimistic), else the longest one scaled up linearly in tokens,
        else `p99_s`."""
        for upto, p99 in self.p99_by_tokens:
            if max_tokens <= upto:
                return p99
        if self.p99_by_tokens:
            upto, p99 = self.p99_by_tokens[-1]
            return p99 * max_tokens / upto
        return self.p99_s


@dataclass(frozen=True)
class Pressure:
    """Reasons not to take local work, from telemetry and the engine loop."""

    engine_errors: int = 0
    memory: bool = False
    thermal: bool = False


class Scheduler:
    """Decides local / offload / reject and the order of local work (earliest deadline
    first). It owns the queue of admitted local jobs; running jobs are reported to it."""

    def __init__(self, config: SchedulerConfig, rates: Rates | None = None) -> None:
        self.config = config
        self.rates = rates or Rates()
        self.queue: list[Job] = []
        self.running: dict[Hashable, Running] = {}
        """Running jobs → tokens they may still generate, and their deadlines."""
        self.limits: tuple[int, int] | None = None
        """(max_batch, prefill_chunk) the engine's decode batch actually runs with, set by
        the engine loop from the batch (`limit_to`); None: the config's, until it is built."""
        self.queue_bound: int | None = None
        """The queue bound chosen with a measured max_batch (serving/capacity.py)."""

    def limit_to(self, max_batch: int, prefill_chunk: int, queue_bound: int | None = None) -> None:
        """Plan with the batch's own limits: an engine compiled for fixed shape ranges (a
        TensorRT plan) prefills whole prompts whatever `prefill_chunk` the config asks for,
        and a chunk the batch will not take must not enter the estimates."""
        self.limits = (max_batch, prefill_chunk)
        self.queue_bound = queue_bound

    @property
    def max_batch(self) -> int:
        """Sequences decoded together: the batch's, else the config's (else, before a model
        is measured, UNMEASURED_MAX_BATCH)."""
        if self.limits is not None:
            return self.limits[0]
        return self.config.max_batch or UNMEASURED_MAX_BATCH

    @property
    def max_queue(self) -> int:
        """Requests that may wait: the config's when set (a live set-config too), else the
        bound chosen with max_batch."""
        if self.config.max_queue is not None:
            return self.config.max_queue
        return self.queue_bound if self.queue_bound is not None else QUEUE_WAVES * self.max_batch

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens prefilled per step (0: whole prompts): the batch's, else the
        config's."""
        return self.config.prefill_chunk if self.limits is None else self.limits[1]

    # -- decisions ----------------------------------------------------------------------

    def admit(self, job: Job, now: float, cloud: CloudState, pressure: Pressure) -> Decision:
        """Decide for a new request. LOCAL also enqueues it."""
        trouble = self._local_trouble(pressure)
        full = False
        if trouble is None:
            if len(self.queue) >= self.max_queue:
                full = True
                trouble = f"the local queue is full ({self.max_queue} waiting)"
            else:
                finish = self._estimate_finish(job, now)
                if finish > job.deadline:
                    trouble = (
                        f"local estimate {finish - now:.2f}s exceeds the deadline "
                        f"{job.deadline - now:.2f}s"
                    )
                else:
                    trouble, deferred = self._join_or_defer(job, now)
                    if deferred is not None:
                        job, finish = deferred
                if trouble is None:
                    self._enqueue(job)
                    reason = "local estimate meets the deadline"
                    if job.waits_for:
                        reason += (f", starting after {len(job.waits_for)} admitted "
                                   f"request(s) it would otherwise delay past their deadlines")
                    return Decision(Action.LOCAL, reason, estimated_finish=finish)
        decision = self._elsewhere(job, now, cloud, trouble)
        if full and decision.action is Action.REJECT:
            return dataclasses.replace(decision, queue_full=True)
        return decision

    def review(
        self, now: float, cloud: CloudState, pressure: Pressure
    ) -> list[tuple[Job, Decision]]:
        """Re-decide queued jobs that can no longer finish in time (or cannot be served
        locally at all); they leave the queue with an OFFLOAD or REJECT decision."""
        out: list[tuple[Job, Decision]] = []
        trouble = self._local_trouble(pressure)
        # One simulation gives every queued job's finish (the queue is in deadline order,
        # so the jobs ahead of each are exactly those it waits for): O(queue), not O(queue²).
        finishes = {} if trouble else self._finish_times(now, self._running(), self.queue)
        for job in list(self.queue):
            reason = trouble
            if reason is None:
                # Without the safety margin admission used: a job admitted near its limit is
                # not refused a moment later because one more step sample moved the rates;
                # it leaves once its plain estimate says it cannot finish in time.
                if finishes[job.key] <= job.deadline:
                    continue
                reason = f"waited {now - job.arrival:.2f}s; local finish now past its deadline"
            self.queue.remove(job)
            out.append((job, self._elsewhere(job, now, cloud, reason)))
        return out

    def next_batch(self, free_slots: int, now: float = math.inf) -> list[Job]:
        """Queued jobs to start at `now` (earliest deadline first; a deferred job once those
        it waits for are gone or its time has come — at the default, infinitely late, every
        job); they count as running."""
        # Built only when some queued job is deferred (it is what may_start reads then).
        present = set(self.running) | {j.key for j in self.queue} if any(
            j.waits_for for j in self.queue) else set()
        take: list[Job] = []
        for job in self.queue:
            if len(take) >= free_slots:
                break
            if job.may_start(now, present):
                take.append(job)
        taken = {j.key for j in take}
        self.queue = [j for j in self.queue if j.key not in taken]
        for job in take:
            self.running[job.key] = Running(job.max_tokens, job.deadline)
        return take

    # -- bookkeeping from the engine loop -------------------------------------------------

    def progressed(self, key: Hashable, tokens: int = 1) -> None:
        r = self.running.get(key)
        if r is not None:
            r.remaining = max(0, r.remaining - tokens)

    def finished(self, key: Hashable) -> None:
        self.running.pop(key, None)

    def cancel(self, key: Hashable) -> bool:
        """Drop a queued or running job whose client went away."""
        before = len(self.queue)
        self.queue = [j for j in self.queue if j.key != key]
        return self.running.pop(key, None) is not None or len(self.queue) != before

    # -- internals ------------------------------------------------------------------------

    def _enqueue(self, job: Job) -> None:
        """Keep the queue in deadline order (ties: arrival order), as the estimate assumes."""
        i = len(self.queue)
        while i > 0 and self.queue[i - 1].deadline > job.deadline:
            i -= 1
        self.queue.insert(i, job)

    def _local_trouble(self, pressure: Pressure) -> str | None:
        if pressure.engine_errors >= self.config.engine_error_limit:
            return f"the local engine failed {pressure.engine_errors} times recently"
        if pressure.memory:
            return "the device is under memory pressure"
        if pressure.thermal:
            return "the device is thermally throttled"
        return None

    def _running(self) -> list[tuple[Hashable, int, float]]:
        return [(key, r.remaining, r.deadline) for key, r in self.running.items()]

    def _deadlines(self) -> dict[Hashable, float]:
        """The deadline of every admitted job, running or queued."""
        return {key: r.deadline for key, r in self.running.items()} | {
            j.key: j.deadline for j in self.queue}

    def _join_or_defer(self, job: Job, now: float) -> tuple[str | None, tuple[Job, float] | None]:
        """(None, None) when `job` may join at once; else (None, (deferred job, its finish))
        when it can wait for the admitted jobs it would delay and still meet its deadline;
        else (why it must not join, None)."""
        pushed = self._pushed(job, now)
        if not pushed:
            return None, None
        first = pushed[0]
        waits: set[Hashable] = set()
        # Waiting for one request can push the newcomer into another's way: widen the set a
        # few times (each round is two simulations); the last round waits for every request
        # admitted so far, which nobody's deadline can object to.
        deadlines = self._deadlines()
        for n in range(DEFER_ROUNDS):
            waits |= set(deadlines) if n == DEFER_ROUNDS - 1 else {key for key, *_ in pushed}
            job = dataclasses.replace(job, waits_for=frozenset(waits),
                                      waits_until=max(deadlines[k] for k in waits))
            pushed = self._pushed(job, now)
            if not pushed:
                break
        _, before, after, dl = first
        why = (f"it would push an admitted request past its deadline (finish "
               f"{before - now:.2f}s → {after - now:.2f}s, deadline {dl - now:.2f}s)")
        if pushed:  # its share of the serving path alone is too much for someone
            return f"{why}, even if it waited for every admitted request", None
        finish = self._estimate_finish(job, now)
        if finish <= job.deadline:
            return None, (job, finish)
        return (f"{why}, and waiting for it would make this one miss its own (finish "
                f"{finish - now:.2f}s, deadline {job.deadline - now:.2f}s)"), None

    def _pushed(self, job: Job, now: float) -> list[tuple[Hashable, float, float, float]]:
        """The admitted jobs that finish in time without `job` and would miss their deadlines
        with it (its prefill pauses them, its row slows every step): (key, finish without,
        finish with, deadline) each."""
        running, queue = self._running(), self.queue
        if not running and not queue:
            return []
        before = self._finish_times(now, running, queue)
        after = self._finish_times(now, running, sorted([*queue, job], key=lambda j: j.deadline))
        safety = self.config.safety
        out = []
        for key, dl in self._deadlines().items():
            if key not in before or key not in after:
                continue
            if now + (before[key] - now) * safety <= dl < now + (after[key] - now) * safety:
                out.append((key, before[key], after[key], dl))
        return out

    def _elsewhere(self, job: Job, now: float, cloud: CloudState, why: str) -> Decision:
        remaining = job.deadline - now
        if self.config.offload_enabled and cloud.configured and cloud.available:
            p99 = cloud.p99_for(job.max_tokens)
            if remaining > p99:
                return Decision(Action.OFFLOAD, f"{why}; offloaded")
            why = (
                f"{why}; too little time left for the cloud ({remaining:.2f}s ≤ p99 "
                f"{p99:.2f}s at {job.max_tokens} tokens)"
            )
            return self._refuse(job, now, why, 429)
        if self.config.offload_enabled and cloud.configured:
            return self._refuse(job, now, f"{why}; the cloud path is down too", 503)
        return self._refuse(job, now, why, 429)

    def _refuse(self, job: Job, now: float, why: str, status: int) -> Decision:
        """A refusal that says when capacity returns and whether a retry can help: the
        client's budget (`x-request-deadline-ms`) comes again with a retry, but its caller's
        deadline does not move — a retry that cannot finish before the deadline of the
        request it replaces, or a request that misses its budget even alone, is pointless
        (a client that retried would answer its caller 2 s later, and still a refusal)."""
        back = self._capacity_returns(now)
        alone = self.alone_s(job)
        hopeless = alone > job.deadline - job.arrival or now + back + alone > job.deadline
        return Decision(Action.REJECT, why, status, back, should_retry=False if hopeless else None)

    def alone_s(self, job: Job) -> float:
        """The job's estimate on an idle device (safety included)."""
        end = self._simulate(0.0, [], [dataclasses.replace(job, deadline=math.inf)], job.key)
        return end * self.config.safety

    def _capacity_returns(self, now: float) -> float:
        """Seconds until a newcomer would find a free slot with nobody queued ahead: when
        the running and queued work is down to max_batch - 1 jobs (0: now)."""
        finishes = sorted(self._finish_times(now, self._running(), self.queue).values())
        extra = len(finishes) - (self.max_batch - 1)
        if extra <= 0:
            return 0.0
        return max(0.0, (finishes[extra - 1] - now) * self.config.safety)

    def _estimate_finish(self, job: Job, now: float) -> float:
        """When a new job would finish (review() estimates queued ones in one pass)."""
        # Earliest deadline first: jobs due later than this one do not delay it, unless it
        # is deferred behind them.
        ahead = [j for j in self.queue if j.deadline <= job.deadline or j.key in job.waits_for]
        end = self._simulate(now, self._running(), [*ahead, job], target=job.key)
        return now + (end - now) * self.config.safety

    def _simulate(
        self,
        now: float,
        running: list[tuple[Hashable, int, float]],
        queue: Iterable[Job],
        target: Hashable | None,
    ) -> float:
        """When `target` finishes (with no target: when everything does)."""
        finishes = self._finish_times(now, running, queue, stop_at=target)
        if target is not None:
            return finishes[target]
        return max(finishes.values(), default=now)

    def _finish_times(
        self,
        now: float,
        running: list[tuple[Hashable, int, float]],
        queue: Iterable[Job],
        stop_at: Hashable | None = None,
    ) -> dict[Hashable, float]:
        """Event simulation of the decode batch: the finish time of each running (key,
        tokens left, deadline) and queued job, assuming each uses all its max_tokens.

        A running job leaves at its deadline at the latest (the engine loop ends it there),
        so it holds its slot no longer than that. A queued job is not cut in the simulation:
        its finish past its deadline is what sends it elsewhere."""
        finishes: dict[Hashable, float] = {}
        t = now
        # [key, tokens left, deadline at which the engine ends it (inf: not cut)]
        active: list[tuple[Hashable, int, float]] = [r for r in running if r[1] > 0]
        pending = list(queue)
        cap, chunk = self.max_batch, self.prefill_chunk
        # Keys still running or queued, for deferred jobs (Job.may_start), as next_batch sees
        # them: finished jobs leave it, jobs started stay.
        present = {key for key, _, _ in active} | {j.key for j in pending}
        deferred = any(j.waits_for for j in pending)
        # What a request costs beyond its prefill and steps: a fixed part, and a part for
        # each other request in the daemon with it (Rates.per_concurrent_s) — not counting
        # those deferred behind it, nor those it is deferred behind: a deferred request was
        # parsed before and answers after them, and what it costs in between is its wait.
        others = len(active) + len(pending) - 1
        apart: dict[Hashable, int] = {}
        for j in pending:
            for key in j.waits_for & present:
                apart[key] = apart.get(key, 0) + 1
                apart[j.key] = apart.get(j.key, 0) + 1

        def extra(key: Hashable) -> float:
            return self.rates.per_request_s + self.rates.per_concurrent_s * max(
                0, others - apart.get(key, 0))

        while pending or active:
            while pending and len(active) < cap:
                i = next((n for n, j in enumerate(pending) if j.may_start(t, present)), None)
                if i is None:
                    if active:
                        break
                    # Nothing runs, so every key a deferred job waits for is gone: this does
                    # not happen; guard the loop anyway by moving to the earliest start.
                    t = max(t, min(j.waits_until for j in pending))
                    i = 0
                j = pending.pop(i)
                t += self.rates.prefill_time(j.prompt_tokens)  # prefill pauses decoding
                waits = prefill_waits(j.prompt_tokens, chunk)  # holding its slot meanwhile
                # token 1 comes with the prefill
                active.append((j.key, max(0, j.max_tokens - 1) + waits, math.inf))
            if not active:
                break
            step = self.rates.step_time(len(active))
            # Steps until the next event: a job's last token, a running job's deadline, or
            # the time a deferred job starts whatever.
            k = min(rem for _, rem, _ in active)
            for _, _, dl in active:
                if dl < math.inf:
                    k = min(k, max(1, math.ceil((dl - t) / step - 1e-9)))
            if deferred and len(active) < cap:
                for j in pending:
                    if j.waits_for and t < j.waits_until < math.inf:
                        k = min(k, max(1, math.ceil((j.waits_until - t) / step - 1e-9)))
            t += k * step
            left = []
            for key, rem, dl in active:
                if rem <= k or t >= dl:
                    finishes[key] = t + extra(key)
                    present.discard(key)
                else:
                    left.append((key, rem - k, dl))
            if stop_at is not None and stop_at in finishes:
                break
            active = left
        return finishes


def prefill_waits(prompt_tokens: int, chunk: int) -> int:
    """Decode steps a prompt waits out before its first token when it is prefilled `chunk`
    tokens after each step (BatchDecoder's chunked prefill; 0 = whole prompts at once)."""
    return math.ceil(prompt_tokens / chunk) if 0 < chunk < prompt_tokens else 0


@dataclass
class Running:
    """A job in the decode batch, as the simulation needs it."""

    remaining: int
    """Tokens it may still generate (max_tokens minus those generated)."""
    deadline: float
