"""Replay a request trace through the real `Router` against simulated workers, in virtual time.

A discrete-event simulation: the clock jumps from one event (arrival, end of a prefill, middle
and end of a decode) to the next, so an hour of trace replays in about a second and the result
does not depend on the machine. Only the routing decisions themselves run for real, and their
wall time is what `decision_*_ms` reports.

Each simulated worker is a crude but honest engine:

- a prefix cache of full blocks, LRU and prefix-closed (a block is evicted only once no cached
  block hangs off it); the blocks of running requests are pinned;
- one prefill at a time, first come first served, at `prefill_tokens_per_s` over the tokens
  its cache does not hold when the prefill *starts* (not when the request was routed: a
  request queued behind another with the same new prefix finds it cached);
- a request is admitted to prefill only when its whole footprint (new blocks, partial last
  block, output) fits beside the pinned blocks, evicting unpinned ones as needed, so the KV
  capacity is never exceeded;
- decodes run beside prefill at `decode_tokens_per_s` each and do not slow it down.

The workers report to the router as real ones would: `BlockStored` / `BlockRemoved` into
`router.index`, `first_token` when the prefill ends, `tokens` halfway through the decode and
`finish` at the end.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bisllm_server.kv_events import BlockRemoved, BlockStored
from bisllm_server.router.config import Policy, RouterConfig
from bisllm_server.router.core import Router, RouteRequest
from bisllm_server.router.traces import TraceRequest


@dataclass
class SimWorkerModel:
    """How fast and how big one simulated worker is.

    The defaults are sized on the Mooncake synthetic trace (3,993 requests over 1,022 s, 15.3K
    input tokens per request, 56.7K input tokens/s in all) with 8 workers, measured with
    benchmarks/bench_router.py (docs/benchmarks.md, "KV-aware router: trace replay"):

    - prefill 12,000 tokens/s, about an 8B model on one H100. Round-robin finds only ~6% of
      prompt tokens cached, keeps each worker's prefill busy 59% of the trace, and its TTFT is
      p50 1.5 s / p99 18 s: loaded, not hopelessly overloaded. At 10,000 tokens/s it is 71%
      busy (p99 32 s); at 8,000, 88% busy with p99 83 s (queues grow for minutes); at 16,000,
      44% busy, where routing hardly matters.
    - KV capacity 400,000 tokens, about that model's free KV on an 80 GB card. The trace
      touches 20.6M distinct full-block tokens (2.6M per worker even if perfectly
      partitioned), so every policy evicts (round-robin 105K blocks, kv 74K), and the largest
      request (191K tokens) still fits alone. With 200K kv's hit rate falls to 19%, with 800K
      it reaches 47%, with 4M (no eviction for kv) 64%, the trace's ceiling.
    - decode 50 tokens/s per request: a typical 20 ms ITL. Outputs here are short (mean 149
      tokens), so decode matters mostly through the KV it keeps pinned.
    """

    kv_capacity_tokens: int = 400_000
    prefill_tokens_per_s: float = 12_000.0
    decode_tokens_per_s: float = 50.0
    block_size: int = 512  # the trace's block size: block ids name blocks of this many tokens
    max_num_tokens: int = 8192  # per-step token budget reported to the router (queue threshold)


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """One request's fate in the simulation."""

    arrival_s: float
    worker: str
    input_tokens: int
    cached_tokens: int  # found in the worker's cache when its prefill started
    best_cached_tokens: int  # router's view at routing time (reported plus predicted blocks)
    ttft_s: float


@dataclass
class SimResult:
    policy: str
    workers: int
    requests: int
    hit_rate: float  # cached prompt tokens found at prefill start / prompt tokens
    # The best cached prefix any worker had at routing time in the router's view (reported
    # plus predicted blocks), and the same from reported blocks alone.
    best_hit_rate: float
    best_reported_hit_rate: float
    efficiency: float | None  # hit_rate / best_hit_rate; None when nothing could hit
    imbalance: float  # max / mean busy prefill seconds over workers
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    decision_p50_ms: float
    decision_p99_ms: float
    prefill_utilisation: float  # mean busy prefill seconds / last arrival time
    busy_s_per_worker: list[float]
    routed_per_worker: list[int]
    evicted_blocks: int
    peak_kv_tokens: int  # the most KV any worker ever held (cached blocks plus reservations)
    kv_capacity_tokens: int
    makespan_s: float  # virtual time when the last request finished
    outcomes: list[RequestOutcome] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The summary, JSON-ready (per-request outcomes left out)."""
        data = asdict(self)
        del data["outcomes"]
        return data


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating between the two nearest ranks."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# -- one worker's KV cache -------------------------------------------------------------------------


class PrefixCache:
    """Full blocks by chained id, LRU, prefix-closed, with pins and reservations.

    Unpinned blocks sit in `_lru`, least recent first. A block is touched whenever a block
    below it is (requests pin whole chains from the root) and chains are released leaf first,
    so a parent is always more recent than its children and the front of `_lru` is a leaf.
    """

    def __init__(self, capacity_tokens: int, block_size: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.block_size = block_size
        self._parent: dict[int, int | None] = {}
        self._children: dict[int, int] = {}
        self._pins: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.reserved_tokens = 0  # footprint of running requests not (yet) in cached blocks
        self.peak_tokens = 0
        self.evicted = 0

    @property
    def used_tokens(self) -> int:
        return len(self._parent) * self.block_size + self.reserved_tokens

    def __contains__(self, block: int) -> bool:
        return block in self._parent

    def blocks(self) -> set[int]:
        return set(self._parent)

    def cached_prefix(self, block_ids: Sequence[int]) -> int:
        """How many leading blocks are cached (a scan: prefix-closed, so it stops at a miss)."""
        n = 0
        for block in block_ids:
            if block not in self._parent:
                break
            n += 1
        return n

    def evictable_tokens(self, keep: Sequence[int]) -> int:
        """What eviction could free, leaving `keep` (about to be pinned) alone."""
        kept = sum(1 for b in keep if self._pins.get(b, 0) == 0)
        return (len(self._lru) - kept) * self.block_size

    def pin(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            count = self._pins.get(block, 0)
            if count == 0:
                self._lru.pop(block, None)
            self._pins[block] = count + 1

    def unpin(self, blocks: Sequence[int]) -> None:
        # Leaf first, so the chain's root ends up the most recent (see the class docstring).
        for block in reversed(blocks):
            count = self._pins[block] - 1
            if count:
                self._pins[block] = count
            else:
                del self._pins[block]
                self._lru[block] = None

    def make_room(self, tokens: int) -> list[int]:
        """Evict least recently used blocks until `tokens` more fit; returns the evicted ids,
        leaves first. The caller has checked with `evictable_tokens` that enough can go."""
        evicted = []
        while self.used_tokens + tokens > self.capacity_tokens:
            block, _ = self._lru.popitem(last=False)
            assert self._children.get(block, 0) == 0, "evicting a block with cached children"
            parent = self._parent.pop(block)
            self._children.pop(block, None)
            if parent is not None:
                self._children[parent] -= 1
            evicted.append(block)
        self.evicted += len(evicted)
        return evicted

    def reserve(self, tokens: int) -> None:
        self.reserved_tokens += tokens
        self.peak_tokens = max(self.peak_tokens, self.used_tokens)
        assert self.used_tokens <= self.capacity_tokens, "KV capacity exceeded"

    def release(self, tokens: int) -> None:
        self.reserved_tokens -= tokens

    def store(self, blocks: Sequence[int], parent: int | None) -> None:
        """Cache new blocks (pinned by their request) in place of their reservation."""
        for block in blocks:
            self._parent[block] = parent
            self._children[block] = 0
            if parent is not None:
                self._children[parent] += 1
            self._pins[block] = self._pins.get(block, 0) + 1
            parent = block
        self.reserved_tokens -= len(blocks) * self.block_size


# -- the simulation --------------------------------------------------------------------------------


class _Clock:
    """Virtual time, shared with the router so its TTLs age with the trace."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Request:
    rid: str
    trace: TraceRequest
    route: RouteRequest
    worker: int = -1
    best_cached_tokens: int = 0
    best_reported_tokens: int = 0
    decision_s: float = 0.0
    hit_blocks: int = 0
    pinned: list[int] = field(default_factory=list)
    extra_tokens: int = 0  # partial last block plus output: reserved, never cached
    ttft_s: float = -1.0


@dataclass
class _Worker:
    name: str
    cache: PrefixCache
    queue: deque[_Request] = field(default_factory=deque)
    prefilling: bool = False
    busy_s: float = 0.0
    routed: int = 0


class _Simulation:
    def __init__(self, router: Router, clock: _Clock, model: SimWorkerModel, workers: int) -> None:
        self.router = router
        self.clock = clock
        self.model = model
        self.workers = [
            _Worker(f"w{i}", PrefixCache(model.kv_capacity_tokens, model.block_size))
            for i in range(workers)
        ]
        self.by_name = {w.name: i for i, w in enumerate(self.workers)}
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.done: list[_Request] = []
        self._waiting: dict[str, _Request] = {}  # held in the router's queue, by request id
        self.last_event_s = 0.0

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1  # ties run in the order they were scheduled
        heapq.heappush(self._events, (when, self._seq, action))

    def run_until(self, when: float) -> None:
        """Every event up to and including `when` (a request finishing frees room first)."""
        while self._events and self._events[0][0] <= when:
            t, _, action = heapq.heappop(self._events)
            self.clock.now = self.last_event_s = t
            action()
        if math.isfinite(when):
            self.clock.now = max(self.clock.now, when)

    # -- routing -------------------------------------------------------------------------------

    def arrive(self, request: _Request) -> None:
        if self.router.must_queue(request.route):
            self.router.enqueue(request.route)
            self._waiting[request.rid] = request
            return
        self.route(request)

    def route(self, request: _Request) -> None:
        decision = self.router.choose(request.route)
        self.router.start(decision, request.route)
        request.best_cached_tokens = decision.best_cached_tokens
        request.best_reported_tokens = self.best_reported_tokens(request.trace)
        request.decision_s = decision.decision_seconds
        request.worker = self.by_name[decision.worker]
        worker = self.workers[request.worker]
        worker.routed += 1
        worker.queue.append(request)
        self.try_prefill(worker)

    def best_reported_tokens(self, trace: TraceRequest) -> int:
        """Best cached prefix over workers from their reported blocks only (no predictions)."""
        index = self.router.index
        best = max(index.reported_overlap(w.name, trace.block_ids) for w in self.workers)
        return min(trace.input_tokens, best * self.model.block_size)

    def check_index(self) -> None:
        """The router's index must mirror every worker's cache exactly, or an event was lost."""
        for w in self.workers:
            mirrored = {block for block, _ in self.router.index.blocks(w.name)}
            if mirrored != w.cache.blocks():
                raise AssertionError(f"{w.name}: the router's index drifted from the cache")

    def drain_router_queue(self) -> None:
        while (route := self.router.next_queued()) is not None:
            self.route(self._waiting.pop(route.request_id))

    # -- a worker's life -----------------------------------------------------------------------

    def try_prefill(self, worker: _Worker) -> None:
        """Start the head of the worker's queue if the worker is free and its KV fits."""
        if worker.prefilling or not worker.queue:
            return
        request = worker.queue[0]
        cache, trace = worker.cache, request.trace
        ids = trace.block_ids
        hit = cache.cached_prefix(ids)
        block = self.model.block_size
        extra = trace.input_tokens - len(ids) * block + trace.output_tokens
        need = (len(ids) - hit) * block + extra
        free = cache.capacity_tokens - cache.used_tokens + cache.evictable_tokens(ids[:hit])
        if need > free:
            return  # wait for running requests to finish and unpin their blocks
        worker.queue.popleft()
        cache.pin(ids[:hit])
        evicted = cache.make_room(need)
        if evicted:
            self.router.index.apply(worker.name, BlockRemoved(evicted))
        cache.reserve(need)
        request.hit_blocks = hit
        request.pinned = list(ids[:hit])
        request.extra_tokens = extra
        # An engine recomputes at least the last prompt token to get the first output's logits.
        seconds = max(1, trace.input_tokens - hit * block) / self.model.prefill_tokens_per_s
        worker.prefilling = True
        worker.busy_s += seconds
        self.at(self.clock.now + seconds, lambda: self.prefill_done(worker, request))

    def prefill_done(self, worker: _Worker, request: _Request) -> None:
        ids = request.trace.block_ids
        new = list(ids[request.hit_blocks :])
        if new:
            parent = ids[request.hit_blocks - 1] if request.hit_blocks else None
            worker.cache.store(new, parent)
            request.pinned.extend(new)
            self.router.index.apply(
                worker.name, BlockStored(new, parent, [], self.model.block_size)
            )
        self.router.first_token(request.rid)
        request.ttft_s = self.clock.now - request.trace.arrival_s
        worker.prefilling = False
        # The first output token came with the prefill; the rest decode at the per-request rate.
        remaining = max(0, request.trace.output_tokens - 1)
        decode_s = remaining / self.model.decode_tokens_per_s
        if remaining >= 2:
            # One mid-decode update keeps the router's decode load right on average, without
            # an event per token.
            self.at(
                self.clock.now + decode_s / 2,
                lambda: self.router.tokens(request.rid, remaining // 2),
            )
        self.at(self.clock.now + decode_s, lambda: self.finish(worker, request))
        self.try_prefill(worker)
        self.drain_router_queue()

    def finish(self, worker: _Worker, request: _Request) -> None:
        self.router.finish(request.rid)
        worker.cache.unpin(request.pinned)
        worker.cache.release(request.extra_tokens)
        self.done.append(request)
        self.try_prefill(worker)
        self.drain_router_queue()


def simulate(
    trace: Sequence[TraceRequest],
    policy: Policy,
    workers: int,
    model: SimWorkerModel | None = None,
    seed: int = 0,
    config_overrides: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """Route every request of `trace` (in arrival order) with a fresh `Router` over `workers`
    simulated workers and run them to completion. `progress(n)` is called every so often
    with the number of requests routed so far."""
    model = model or SimWorkerModel()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    too_big = [r for r in trace if r.input_tokens + r.output_tokens > model.kv_capacity_tokens]
    if too_big:
        largest = max(r.input_tokens + r.output_tokens for r in too_big)
        raise ValueError(
            f"{len(too_big)} requests need more KV than a worker holds (largest {largest} tokens, "
            f"capacity {model.kv_capacity_tokens}); raise the KV capacity"
        )
    config = RouterConfig(**{**dict(config_overrides or {}), "policy": policy})
    clock = _Clock()
    router = Router(config, rng=random.Random(seed), clock=clock)
    sim = _Simulation(router, clock, model, workers)
    for w in sim.workers:
        router.add_worker(w.name, block_size=model.block_size, max_num_tokens=model.max_num_tokens)

    for i, r in enumerate(trace):
        sim.run_until(r.arrival_s)
        route = RouteRequest(f"r{i}", r.input_tokens, r.block_ids)
        sim.arrive(_Request(route.request_id, r, route))
        if progress is not None and (i + 1) % 256 == 0:
            progress(i + 1)
    sim.run_until(math.inf)
    if progress is not None:
        progress(len(trace))
    if len(sim.done) != len(trace):
        raise RuntimeError(f"{len(trace) - len(sim.done)} requests never finished")
    sim.check_index()
    return _result(sim, policy, trace)


def _result(sim: _Simulation, policy: str, trace: Sequence[TraceRequest]) -> SimResult:
    block = sim.model.block_size
    outcomes = [
        RequestOutcome(
            arrival_s=r.trace.arrival_s,
            worker=sim.workers[r.worker].name,
            input_tokens=r.trace.input_tokens,
            cached_tokens=min(r.trace.input_tokens, r.hit_blocks * block),
            best_cached_tokens=r.best_cached_tokens,
            ttft_s=r.ttft_s,
        )
        for r in sorted(sim.done, key=lambda r: int(r.rid[1:]))
    ]
    prompt = sum(o.input_tokens for o in outcomes) or 1
    hit = sum(o.cached_tokens for o in outcomes)
    best = sum(o.best_cached_tokens for o in outcomes)
    best_reported = sum(r.best_reported_tokens for r in sim.done)
    busy = [w.busy_s for w in sim.workers]
    mean_busy = sum(busy) / len(busy)
    ttft = [o.ttft_s for o in outcomes]
    decisions_ms = [r.decision_s * 1000.0 for r in sim.done]
    horizon = max((r.arrival_s for r in trace), default=0.0)
    return SimResult(
        policy=policy,
        workers=len(sim.workers),
        requests=len(outcomes),
        hit_rate=hit / prompt,
        best_hit_rate=best / prompt,
        best_reported_hit_rate=best_reported / prompt,
        efficiency=hit / best if best else None,
        imbalance=max(busy) / mean_busy if mean_busy > 0 else 1.0,
        ttft_mean_s=sum(ttft) / len(ttft) if ttft else 0.0,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        decision_p50_ms=percentile(decisions_ms, 50),
        decision_p99_ms=percentile(decisions_ms, 99),
        prefill_utilisation=mean_busy / horizon if horizon > 0 else 0.0,
        busy_s_per_worker=busy,
        routed_per_worker=[w.routed for w in sim.workers],
        evicted_blocks=sum(w.cache.evicted for w in sim.workers),
        peak_kv_tokens=max(w.cache.peak_tokens for w in sim.workers),
        kv_capacity_tokens=sim.model.kv_capacity_tokens,
        makespan_s=sim.last_event_s,
        outcomes=outcomes,
    )
