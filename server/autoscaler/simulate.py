"""Replay a request trace through simulated workers and the real `Autoscaler`, in virtual time
(`bisllm bench autoscaler`).

Workers run the profile's step-time model (capacity.WorkerProfile) at step granularity, as a
continuous-batching engine does:

- admission is first come, first served: the head of the queue joins the running batch when
  fewer than `max_batch_size` requests run and its KV footprint (prompt + output tokens, held
  until it finishes) fits beside the others'; nothing overtakes a head that does not fit;
- each step decodes one token for every decoding request and gives the rest of the
  `max_num_tokens` budget to prefill chunks, oldest request first;
- a request's first token comes at the end of the step that completes its prefill (TTFT is
  arrival to then), its last `output - 1` steps later; TPOT = (finish - first token) /
  (output - 1). Requests of one output token have no TPOT and meet the TPOT SLO.

Runs of pure-decode steps (nothing to prefill) are jumped over in closed form up to the next
finish or the next event, so an hour of the Azure conv trace replays in seconds.

Arrivals go to the ready worker (not starting, not draining) with the fewest in-flight tokens:
prompt tokens of queued and prefilling requests plus the whole sequence (prompt + tokens so
far) of decoding ones, the engine's own signal (engine/stats.py). A worker is seen as of the
end of the step it is running: an arrival waits for that step, as in the engine.

Every `tick_s` the pool's load (in-flight tokens and requests of ready and draining workers,
the ready worker count) goes to `Autoscaler.observe`, then `decide`, and the pool is brought
to the decided count of ready + starting workers: up by starting workers that take requests
`startup_s` later; down by cancelling starting workers (newest first), then draining the
ready ones with the fewest in-flight tokens (they take no new requests and stop when their
last request finishes). Starting and draining workers cost replica time.

The overshoot oracle is independent of the policy: `needed(t)` replicas is the offered load
(prompt + output tokens arriving in the last `offered_window_s`, per second) over one
replica's sustainable capacity at the TPOT SLO (capacity.sustainable_capacity, for the
trace's mean request), maximised over the last `scale_down_delay_s` (what a policy that may
not scale down sooner must keep), rounded up and clamped to the replica bounds.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bisllm_server.autoscaler.capacity import (
    Capacity,
    WorkerProfile,
    default_profile,
    sustainable_capacity,
)
from bisllm_server.autoscaler.policy import Autoscaler, AutoscalerSettings, LoadSample
from bisllm_server.router.simulate import percentile
from bisllm_server.router.traces import TraceRequest

# SLOs for the embedded CPU profile (docs/benchmarks.md, "Token-based autoscaling"): an
# unloaded worker prefills 99% of the Azure conv prompts in under 1 s and a 2K-token prompt
# beside a full decode batch in ~2 s; a pure decode step at its batch of 8 takes 5-12 ms.
DEFAULT_TTFT_SLO_S = 2.0
DEFAULT_TPOT_SLO_S = 0.1
DEFAULT_TICK_S = 5.0
# Per-replica targets for the embedded CPU profile: the cheapest that met 99% SLO attainment on
# the Azure conv trace at 3x from a cold start of 10 replicas, with the default window, delay
# and rate (benchmarks/bench_autoscaler.py, docs/benchmarks.md).
DEFAULT_TARGETS: dict[str, float] = {"tokens": 2000.0, "concurrency": 1.75}
OFFERED_WINDOW_S = 60.0


@dataclass(slots=True)
class _Request:
    index: int
    arrival: float
    prompt: int  # tokens to prefill (at least 1: the engine needs a token to start from)
    output: int  # tokens to generate (at least 1)
    done: int = 0  # prompt tokens prefilled so far
    first_token: float = -1.0
    finish: float = -1.0
    decode_start: int = 0  # the worker step whose end gave the first token
    worker: int = -1

    @property
    def footprint(self) -> int:
        return self.prompt + self.output


class _Worker:
    """One simulated engine; `advance(t)` runs every step that starts before `t`."""

    def __init__(self, wid: int, profile: WorkerProfile, started: float, ready: float) -> None:
        self.wid = wid
        self.p = profile
        self.started = started
        self.ready_at = ready
        self.stopped: float | None = None
        self.state = "starting" if ready > started else "ready"
        self.drain_time = 0.0
        self.clock = ready  # when its next step may start
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []
        self.finishes: list[tuple[int, int, _Request]] = []  # (finish step, index, request)
        self.batch = 0  # decoding requests
        self.sum_ctx = 0  # their sequence lengths, summed
        self.pending_prompt = 0  # prompt tokens of waiting and prefilling requests
        self.kv_used = 0
        self.requests = 0  # waiting + running
        self.step = 0
        self.empty_since: float | None = ready

    @property
    def in_flight_tokens(self) -> int:
        return self.pending_prompt + self.sum_ctx

    def add(self, r: _Request) -> None:
        r.worker = self.wid
        self.waiting.append(r)
        self.pending_prompt += r.prompt
        self.requests += 1
        self.empty_since = None

    def advance(self, until: float, done: list[_Request]) -> None:
        while self.clock < until:
            if not self.requests:
                if self.empty_since is None:
                    self.empty_since = self.clock
                self.clock = until
                return
            self._admit()
            if self.prefilling:
                self._mixed_step(done)
            else:
                self._decode_run(until, done)

    def _admit(self) -> None:
        p = self.p
        while self.waiting and self.batch + len(self.prefilling) < p.max_batch_size:
            head = self.waiting[0]
            if self.kv_used + head.footprint > p.kv_capacity_tokens:
                return  # strict FCFS: wait for a finish to free room
            self.waiting.popleft()
            self.prefilling.append(head)
            self.kv_used += head.footprint

    def _mixed_step(self, done: list[_Request]) -> None:
        p = self.p
        budget = p.max_num_tokens - self.batch
        tokens = longest_q = longest_kv = 0
        chunks: list[tuple[_Request, int]] = []
        for r in self.prefilling:
            if budget <= 0:
                break
            c = min(r.prompt - r.done, budget)
            tokens += c
            longest_q = max(longest_q, c)
            longest_kv = max(longest_kv, r.done + c)
            budget -= c
            chunks.append((r, c))
        if self.finishes:  # the longest decoding sequence (a decoder gains a token a step)
            longest_kv = max(
                longest_kv,
                max(r.prompt + 1 + self.step - r.decode_start for _, _, r in self.finishes),
            )
        # The engine pads a step with a prefill to sequences x longest query x longest KV.
        padded = (self.batch + len(chunks)) * longest_q * longest_kv
        self.clock += p.step_s(tokens, self.batch, self.sum_ctx, padded)
        self._end_steps(1, done)
        completed = False
        for r, c in chunks:
            r.done += c
            if r.done == r.prompt:
                completed = True
                self._first_token(r, done)
        if completed:
            self.prefilling = [r for r in self.prefilling if r.done < r.prompt]

    def _decode_run(self, until: float, done: list[_Request]) -> None:
        """Pure-decode steps with a fixed batch: up to the next finish (which changes the
        batch) and only those that start before `until`. Step i (from 0) takes a + g * i,
        as every sequence grows by one token a step."""
        p = self.p
        b = self.batch
        a = p.step_s(0, b, self.sum_ctx, 0)
        g = p.per_kv_token_s * b
        limit = self.finishes[0][0] - self.step

        def start(i: int) -> float:  # offset of step i's start from now
            return i * a + g * i * (i - 1) / 2

        n = limit
        if math.isfinite(until):
            span = until - self.clock
            if g > 0:
                half = a - g / 2
                root = (-half + math.sqrt(half * half + 2 * g * span)) / g
            else:
                root = span / a
            n = max(1, min(limit, math.ceil(root)))
            # Correct float rounding: steps 0..n-1 must start before `until`, step n must not.
            while n > 1 and start(n - 1) >= span:
                n -= 1
            while n < limit and start(n) < span:
                n += 1
        self.clock += start(n)  # the end of step n - 1
        self._end_steps(n, done)

    def _end_steps(self, n: int, done: list[_Request]) -> None:
        """`n` steps ended at `self.clock`, each decoding one token per decoding request (no
        finish before the last of them)."""
        self.step += n
        self.sum_ctx += self.batch * n
        while self.finishes and self.finishes[0][0] <= self.step:
            _, _, r = heapq.heappop(self.finishes)
            self.batch -= 1
            self.sum_ctx -= r.footprint
            self._finish(r, done)

    def _first_token(self, r: _Request, done: list[_Request]) -> None:
        r.first_token = self.clock
        self.pending_prompt -= r.prompt
        if r.output == 1:
            self._finish(r, done)
            return
        self.batch += 1
        self.sum_ctx += r.prompt + 1
        r.decode_start = self.step
        heapq.heappush(self.finishes, (self.step + r.output - 1, r.index, r))

    def _finish(self, r: _Request, done: list[_Request]) -> None:
        r.finish = self.clock
        self.kv_used -= r.footprint
        self.requests -= 1
        done.append(r)


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """One served request's fate."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    worker: int
    ttft_s: float
    tpot_s: float | None  # None with a single output token
    finish_s: float


@dataclass(frozen=True, slots=True)
class TickRecord:
    """The pool and the autoscaler at one tick (after the decision was carried out)."""

    time: float
    ready: int
    starting: int
    draining: int
    in_flight_tokens: float
    num_requests: float
    desired_scale: float
    requested: int  # ready + starting
    needed: int  # the oracle's count
    offered_tokens_per_s: float


@dataclass
class AutoscaleResult:
    policy: str  # the signal: tokens or concurrency
    target: float  # per replica, in the signal's unit
    requests: int  # served (the attainments' denominator)
    rejected_requests: int  # longer than the profile's max_seq_len: refused, not simulated
    slo_attainment: float  # share of requests meeting both the TTFT and the TPOT SLO
    ttft_attainment: float
    tpot_attainment: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    replica_hours: float  # replicas over time, starting and draining ones included
    oracle_replica_hours: float  # the integral of needed(t)
    scale_events: int
    max_overshoot_replicas: int  # max over ticks of requested - needed, at least 0
    mean_replicas: float
    peak_replicas: int  # most workers at once, starting and draining included
    makespan_s: float  # when the last request finished (the integrals' horizon)
    capacity_tokens_per_s: float  # one replica's sustainable capacity (the oracle's C)
    capacity_decode_batch: int
    ttft_slo_s: float
    tpot_slo_s: float
    tick_s: float
    startup_s: float
    settings: dict[str, Any]
    profile_source: str
    timeline: list[TickRecord] = field(default_factory=list, repr=False)
    outcomes: list[RequestOutcome] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The summary, JSON-ready (the per-tick timeline and per-request outcomes left out)."""
        data = asdict(self)
        del data["timeline"], data["outcomes"]
        return data


class _Pool:
    def __init__(self, profile: WorkerProfile, startup_s: float) -> None:
        self.profile = profile
        self.startup_s = startup_s
        self.workers: list[_Worker] = []
        self.ready: list[_Worker] = []  # in start order
        self.starting: list[_Worker] = []
        self.draining: list[_Worker] = []
        self.becoming_ready: list[tuple[float, int]] = []  # heap of (ready time, worker id)
        self.done: list[_Request] = []

    def start(self, now: float, warm: bool = False) -> None:
        w = _Worker(len(self.workers), self.profile, now, now if warm else now + self.startup_s)
        self.workers.append(w)
        if w.state == "ready":
            self.ready.append(w)
        else:
            self.starting.append(w)
            heapq.heappush(self.becoming_ready, (w.ready_at, w.wid))

    def next_ready_time(self) -> float:
        return self.becoming_ready[0][0] if self.becoming_ready else math.inf

    def make_ready(self) -> None:
        _, wid = heapq.heappop(self.becoming_ready)
        w = self.workers[wid]
        if w.state != "starting":
            return  # cancelled meanwhile
        w.state = "ready"
        self.starting.remove(w)
        self.ready.append(w)

    def route(self, r: _Request) -> None:
        for w in self.ready:
            w.advance(r.arrival, self.done)
        if self.ready:
            target = min(self.ready, key=lambda w: (w.in_flight_tokens, w.wid))
        else:  # cannot happen with min_replica >= 1, but never drop a request
            target = min(self.starting, key=lambda w: (w.ready_at, w.wid))
        target.add(r)

    def advance_all(self, now: float) -> None:
        for w in self.ready + self.draining:
            w.advance(now, self.done)
        for w in list(self.draining):
            if not w.requests:
                # It stopped when its last request finished: the end of its last step.
                last = w.empty_since if w.empty_since is not None else w.clock
                w.stopped = max(w.drain_time, last)
                w.state = "stopped"
                self.draining.remove(w)

    def resize(self, now: float, desired: int) -> None:
        have = len(self.ready) + len(self.starting)
        for _ in range(desired - have):
            self.start(now)
        excess = have - desired
        if excess <= 0:
            return
        while excess > 0 and self.starting:
            w = self.starting.pop()  # the newest
            w.state, w.stopped = "stopped", now
            excess -= 1
        # Drain the least loaded; the newest of equals (the oldest keep their warm caches).
        for w in sorted(self.ready, key=lambda w: (w.in_flight_tokens, -w.wid))[: max(0, excess)]:
            self.ready.remove(w)
            w.state, w.drain_time = "draining", now
            self.draining.append(w)


def simulate(
    trace: Sequence[TraceRequest],
    settings: AutoscalerSettings,
    profile: WorkerProfile | None = None,
    *,
    tick_s: float = DEFAULT_TICK_S,
    initial_replicas: int | None = None,
    startup_s: float | None = None,
    ttft_slo_s: float = DEFAULT_TTFT_SLO_S,
    tpot_slo_s: float = DEFAULT_TPOT_SLO_S,
    offered_window_s: float = OFFERED_WINDOW_S,
    progress: Callable[[int], None] | None = None,
) -> AutoscaleResult:
    """Replay `trace` (arrival order) under the autoscaler `settings` until every request has
    finished. `startup_s` overrides the profile's; `initial_replicas` (default min_replica)
    are warm at time 0. `progress(n)` is called every so often with the requests arrived."""
    profile = profile or default_profile()
    startup = profile.startup_s if startup_s is None else startup_s
    problems = []
    if not tick_s > 0:
        problems.append(f"tick_s must be > 0, got {tick_s}")
    if not startup >= 0:
        problems.append(f"startup_s must be >= 0, got {startup}")
    if not (ttft_slo_s > 0 and tpot_slo_s > 0):
        problems.append(f"the SLOs must be > 0, got TTFT {ttft_slo_s}, TPOT {tpot_slo_s}")
    if not offered_window_s > 0:
        problems.append(f"offered_window_s must be > 0, got {offered_window_s}")
    if problems:
        raise ValueError("; ".join(problems))
    requests = [
        _Request(i, r.arrival_s, max(1, r.input_tokens), max(1, r.output_tokens))
        for i, r in enumerate(trace)
    ]
    # A worker rejects what exceeds its context at once; those requests never load the pool.
    limit = profile.max_seq_len
    kept = [r for r in requests if limit is None or r.footprint <= limit]
    rejected = len(requests) - len(kept)
    requests = kept
    too_big = [r for r in requests if r.footprint > profile.kv_capacity_tokens]
    if too_big:
        largest = max(r.footprint for r in too_big)
        raise ValueError(
            f"{len(too_big)} requests need more KV than a worker holds (largest {largest} tokens, "
            f"capacity {profile.kv_capacity_tokens}); use a profile with a larger KV capacity"
        )
    n = len(requests)
    mean_prompt = sum(r.prompt for r in requests) / n if n else 1.0
    mean_output = sum(r.output for r in requests) / n if n else 1.0
    capacity = sustainable_capacity(profile, mean_prompt, mean_output, tpot_slo_s)

    autoscaler = Autoscaler(settings, initial_replicas)
    pool = _Pool(profile, startup)
    for _ in range(autoscaler.current):
        pool.start(0.0, warm=True)

    timeline: list[TickRecord] = []
    arrived: deque[tuple[float, int]] = deque()  # (time, tokens) within the offered window
    arrived_tokens = 0
    recent_needs: deque[tuple[float, float]] = deque()  # (time, offered / C)
    max_overshoot = 0
    peak = autoscaler.current
    next_arrival = 0
    tick = 0.0
    while True:
        # The next event: a worker becoming ready, then an arrival, then a tick (ties in
        # that order, so a tick sees the requests that arrived at its instant).
        arrival_time = requests[next_arrival].arrival if next_arrival < n else math.inf
        ready_time = pool.next_ready_time()
        if ready_time <= min(arrival_time, tick):
            pool.make_ready()
            continue
        if arrival_time <= tick:
            r = requests[next_arrival]
            pool.route(r)
            arrived.append((r.arrival, r.footprint))
            arrived_tokens += r.footprint
            next_arrival += 1
            if progress is not None and next_arrival % 256 == 0:
                progress(next_arrival)
            continue

        pool.advance_all(tick)
        if next_arrival == n and len(pool.done) == n:
            break
        sample = LoadSample(
            time=tick,
            in_flight_tokens=float(sum(w.in_flight_tokens for w in pool.ready + pool.draining)),
            num_requests=float(sum(w.requests for w in pool.ready + pool.draining)),
            num_workers=len(pool.ready),
        )
        autoscaler.observe(sample)
        decision = autoscaler.decide(tick)
        pool.resize(tick, decision.rounded_desired_scale)

        while arrived and arrived[0][0] <= tick - offered_window_s:
            arrived_tokens -= arrived.popleft()[1]
        offered = arrived_tokens / offered_window_s
        recent_needs.append((tick, offered / capacity.tokens_per_s))
        while recent_needs[0][0] < tick - settings.scale_down_delay_s:
            recent_needs.popleft()
        raw = max(v for _, v in recent_needs)
        needed = min(max(math.ceil(raw - 1e-9), settings.min_replica), settings.max_replica)
        requested = len(pool.ready) + len(pool.starting)
        max_overshoot = max(max_overshoot, requested - needed)
        peak = max(peak, requested + len(pool.draining))
        timeline.append(
            TickRecord(
                time=tick,
                ready=len(pool.ready),
                starting=len(pool.starting),
                draining=len(pool.draining),
                in_flight_tokens=sample.in_flight_tokens,
                num_requests=sample.num_requests,
                desired_scale=decision.desired_scale,
                requested=requested,
                needed=needed,
                offered_tokens_per_s=offered,
            )
        )
        tick += tick_s
    if progress is not None:
        progress(n)
    return _result(
        requests, pool, timeline, autoscaler, capacity, settings, profile,
        tick_s=tick_s, startup=startup, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
        max_overshoot=max_overshoot, peak=peak, rejected=rejected,
    )  # fmt: skip


def _result(
    requests: list[_Request],
    pool: _Pool,
    timeline: list[TickRecord],
    autoscaler: Autoscaler,
    capacity: Capacity,
    settings: AutoscalerSettings,
    profile: WorkerProfile,
    *,
    tick_s: float,
    startup: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
    max_overshoot: int,
    peak: int,
    rejected: int,
) -> AutoscaleResult:
    end = max((r.finish for r in requests), default=0.0)
    replica_s = sum(
        max(0.0, min(end, w.stopped if w.stopped is not None else end) - w.started)
        for w in pool.workers
    )
    oracle_s = sum(
        rec.needed * max(0.0, min(end, rec.time + tick_s) - rec.time) for rec in timeline
    )
    ttft = [r.first_token - r.arrival for r in requests]
    tpot = [(r.finish - r.first_token) / (r.output - 1) for r in requests if r.output > 1]
    ttft_ok = [t <= ttft_slo_s for t in ttft]
    tpot_ok = [
        r.output == 1 or (r.finish - r.first_token) / (r.output - 1) <= tpot_slo_s for r in requests
    ]
    n = len(requests) or 1
    return AutoscaleResult(
        policy=settings.signal,
        target=settings.target,
        requests=len(requests),
        rejected_requests=rejected,
        slo_attainment=sum(a and b for a, b in zip(ttft_ok, tpot_ok, strict=True)) / n,
        ttft_attainment=sum(ttft_ok) / n,
        tpot_attainment=sum(tpot_ok) / n,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        tpot_p50_s=percentile(tpot, 50),
        tpot_p99_s=percentile(tpot, 99),
        replica_hours=replica_s / 3600,
        oracle_replica_hours=oracle_s / 3600,
        scale_events=autoscaler.scale_events,
        max_overshoot_replicas=max(0, max_overshoot),
        mean_replicas=replica_s / end if end > 0 else float(len(pool.ready)),
        peak_replicas=peak,
        makespan_s=end,
        capacity_tokens_per_s=capacity.tokens_per_s,
        capacity_decode_batch=capacity.decode_batch,
        ttft_slo_s=ttft_slo_s,
        tpot_slo_s=tpot_slo_s,
        tick_s=tick_s,
        startup_s=startup,
        settings=asdict(settings),
        profile_source=profile.source,
        timeline=timeline,
        outcomes=[
            RequestOutcome(
                arrival_s=r.arrival,
                prompt_tokens=r.prompt,
                output_tokens=r.output,
                worker=r.worker,
                ttft_s=r.first_token - r.arrival,
                tpot_s=(r.finish - r.first_token) / (r.output - 1) if r.output > 1 else None,
                finish_s=r.finish,
            )
            for r in requests
        ],
    )
