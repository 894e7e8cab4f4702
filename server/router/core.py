"""The router's decisions and bookkeeping, free of HTTP and clocks it does not own: the live
server and the trace simulator (`bisllm bench router`) run this same code.

A request's life here: `choose` (which worker) -> `start` (count its load there, predict its
blocks, pin its session) -> `first_token` (its prefill is done) -> `tokens` (its KV grows) ->
`finish`. When every worker is saturated (`router_queue_threshold`) requests wait in a queue
ordered by `router_queue_policy` until `next_queued` finds room.

Disaggregated serving (workers announce role "prefill" or "decode"): `choose_pair` picks a
decode worker by load and, unless the prompt is better prefilled there, a prefill worker by
the KV scorer; `start_pair` counts both. The prefill worker's share ends with the request's
first token, when its KV has reached the decode worker.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, get_args

from bisllm_server.router.config import RouterConfig
from bisllm_server.router.index import KVIndex
from bisllm_server.router.scoring import (
    WorkerLoad,
    is_saturated,
    least_loaded,
    round_robin_order,
    softmax_pick,
    worker_costs,
)

WorkerStatus = Literal["ready", "draining", "down"]
# "both": an aggregated worker that prefills and decodes its own requests.
WorkerRole = Literal["both", "prefill", "decode"]


class NoWorkerAvailable(Exception):
    """No healthy worker may take the request (all down, draining or excluded)."""


@dataclass
class WorkerInfo:
    name: str
    block_size: int
    status: WorkerStatus = "ready"
    load: WorkerLoad = field(default_factory=WorkerLoad)
    routed_total: int = 0
    role: WorkerRole = "both"


@dataclass
class RouteRequest:
    request_id: str
    prompt_tokens: int
    block_ids: Sequence[int]  # chained ids of the prompt's full blocks
    session: str | None = None
    exclude: frozenset[str] = frozenset()  # workers that already failed this request


@dataclass
class Decision:
    request_id: str
    worker: str
    reason: str  # kv | session | round_robin | least_load | only
    prompt_tokens: int
    block_size: int
    overlap_blocks: int  # the chosen worker's cached prefix, in blocks (router's estimate)
    best_overlap_blocks: int  # the best any candidate holds
    costs: dict[str, float]
    decision_seconds: float

    @property
    def estimated_cached_tokens(self) -> int:
        return min(self.prompt_tokens, self.overlap_blocks * self.block_size)

    @property
    def best_cached_tokens(self) -> int:
        return min(self.prompt_tokens, self.best_overlap_blocks * self.block_size)


@dataclass
class PairDecision:
    """Where a disaggregated request goes: decoded on `decode.worker`, its prompt's KV pulled
    from `prefill_peers` (the chosen prefill worker first, then a fallback), or prefilled on
    the decode worker itself when `prefill` is None."""

    decode: Decision
    prefill: Decision | None
    mode: str  # remote | local
    reason: str  # remote | short_prompt | prefill_busy | no_prefill_worker
    prefill_peers: list[str] = field(default_factory=list)  # empty when local


class PoolLoad(NamedTuple):
    """Load summed over the workers that are up (ready or draining), each counted as the larger
    of the router's own bookkeeping and the worker's last report, plus the prompts waiting in
    the router's queue: work the pool owes whether or not a worker has taken it yet."""

    in_flight_tokens: int
    requests: int
    ready_workers: int


@dataclass
class _InFlight:
    worker: str
    prefill_tokens: int  # counted in pending_prefill_tokens until the first token
    kv_tokens: int  # prompt plus generated, counted in decode_tokens after the first token
    prefilled: bool = False


class Router:
    def __init__(
        self,
        config: RouterConfig,
        *,
        index: KVIndex | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.index = index if index is not None else KVIndex(config.predicted_ttl_s, clock)
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self.block_size: int | None = None  # every worker must page its KV the same way
        self._in_flight: dict[str, _InFlight] = {}
        # request id -> its share of a prefill worker, for a request decoded elsewhere.
        self._prefill_legs: dict[str, _InFlight] = {}
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._rr = itertools.count()
        self._queue: list[tuple[tuple, int, RouteRequest]] = []
        self._queue_seq = itertools.count()

    # -- workers -------------------------------------------------------------------------------

    def add_worker(
        self, name: str, *, block_size: int, max_num_tokens: int = 2048, role: str = "both"
    ) -> WorkerInfo:
        checked = _worker_role(name, role)  # before any change: a refused worker leaves no trace
        if self.block_size is None:
            self.block_size = block_size
        elif block_size != self.block_size:
            raise ValueError(
                f"worker {name} pages KV in blocks of {block_size} tokens, the others in "
                f"{self.block_size}: serve every worker with the same config"
            )
        info = self.workers.get(name)
        if info is None:
            info = self.workers[name] = WorkerInfo(name, block_size)
            self.index.add_worker(name)
        info.load.max_num_tokens = max_num_tokens
        info.role = checked  # a restarted worker may come back in another role
        return info

    def remove_worker(self, name: str) -> list[str]:
        """Forget a worker; returns the ids of the requests that were in flight on it."""
        self.workers.pop(name, None)
        self.index.remove_worker(name)
        lost = [rid for rid, f in self._in_flight.items() if f.worker == name]
        for rid in lost:
            del self._in_flight[rid]
        # A prefill worker's legs are not lost requests: their decode workers prefill locally.
        for rid in [rid for rid, f in self._prefill_legs.items() if f.worker == name]:
            del self._prefill_legs[rid]
        if not self.workers:
            self.block_size = None
        return lost

    def set_status(self, name: str, status: WorkerStatus) -> None:
        self.workers[name].status = status

    def candidates(self, exclude: Iterable[str] = (), role: WorkerRole | None = None) -> list[str]:
        """Ready workers not in `exclude`; of `role` only, unless it is None."""
        skip = set(exclude)
        return [
            n
            for n, w in self.workers.items()
            if w.status == "ready" and n not in skip and (role is None or w.role == role)
        ]

    @property
    def disaggregated(self) -> bool:
        """Some worker serves one phase only, so requests are placed as prefill/decode pairs."""
        return any(w.role != "both" for w in self.workers.values())

    def members(self, role: WorkerRole) -> Callable[[str], bool]:
        """Whether a worker (by name) has `role` now: a `pool_load` pool."""

        def member(name: str) -> bool:
            info = self.workers.get(name)
            return info is not None and info.role == role

        return member

    # -- choosing --------------------------------------------------------------------------------

    def choose(self, request: RouteRequest) -> Decision:
        start = time.perf_counter()
        names = self.candidates(request.exclude)
        if not names:
            raise NoWorkerAvailable(
                "no worker is available"
                + (f" (tried {', '.join(sorted(request.exclude))})" if request.exclude else "")
            )
        assert self.block_size is not None
        overlaps = self.index.overlaps(request.block_ids, names)
        pinned = self._session_worker(request.session)
        costs: dict[str, float] = {}
        if self.config.policy == "round_robin":
            worker, reason = round_robin_order(names, next(self._rr))[0], "round_robin"
        elif self.config.policy == "least_load":
            loads = {n: self.workers[n].load for n in names}
            worker, reason = least_loaded(loads, self.rng), "least_load"
        elif pinned in names and self.config.router_session_affinity_score_multiplier == 0:
            worker, reason = pinned, "session"
        else:
            costs = worker_costs(
                self.config,
                {n: self.workers[n].load for n in names},
                overlaps,
                prompt_tokens=request.prompt_tokens,
                block_size=self.block_size,
                pinned=pinned,
            )
            worker = softmax_pick(costs, self.config.router_temperature, self.rng)
            reason = "session" if worker == pinned else ("kv" if len(names) > 1 else "only")
        return self._decision(request, worker, reason, overlaps, costs, time.perf_counter() - start)

    def _decision(
        self,
        request: RouteRequest,
        worker: str,
        reason: str,
        overlaps: dict[str, int],
        costs: dict[str, float],
        seconds: float,
    ) -> Decision:
        assert self.block_size is not None
        return Decision(
            request_id=request.request_id,
            worker=worker,
            reason=reason,
            prompt_tokens=request.prompt_tokens,
            block_size=self.block_size,
            overlap_blocks=overlaps.get(worker, 0),
            best_overlap_blocks=max(overlaps.values(), default=0),
            costs=costs,
            decision_seconds=seconds,
        )

    def choose_pair(self, request: RouteRequest) -> PairDecision:
        """A decode worker by load and, for a prompt worth moving, a prefill worker by KV."""
        start = time.perf_counter()
        decode = self._choose_decode(request)
        uncached = decode.prompt_tokens - decode.estimated_cached_tokens
        prefills = self.candidates(request.exclude, role="prefill")
        prefill: Decision | None = None
        peers: list[str] = []
        limit = self.config.disagg_max_prefill_queue
        if uncached <= self.config.disagg_max_local_prefill_tokens:
            reason = "short_prompt"
        elif not prefills:
            reason = "no_prefill_worker"
        elif limit > 0 and all(self.workers[n].load.requests >= limit for n in prefills):
            reason = "prefill_busy"
        else:
            reason = "remote"
            prefill, peers = self._choose_prefill(request, prefills)
        elapsed = time.perf_counter() - start
        for decision in (decode, prefill):
            if decision is not None:
                decision.decision_seconds = elapsed
        mode = "local" if prefill is None else "remote"
        return PairDecision(decode, prefill, mode, reason, peers)

    def _choose_decode(self, request: RouteRequest) -> Decision:
        """The least loaded decode worker (its cache matters less: a remote prefill brings the
        KV along), or the session's pinned one under hard affinity."""
        names = self.candidates(request.exclude, role="decode")
        if not names:
            raise NoWorkerAvailable(
                "no decode worker is available"
                + (f" (tried {', '.join(sorted(request.exclude))})" if request.exclude else "")
            )
        assert self.block_size is not None
        pinned = self._session_worker(request.session)
        if pinned in names and self.config.router_session_affinity_score_multiplier == 0:
            worker, reason = pinned, "session"
        else:
            loads = {n: self.workers[n].load for n in names}
            worker, reason = least_loaded(loads, self.rng), "decode"
        overlaps = self.index.overlaps(request.block_ids, names)
        return self._decision(request, worker, reason, overlaps, {}, 0.0)  # timed by choose_pair

    def _choose_prefill(
        self, request: RouteRequest, names: list[str]
    ) -> tuple[Decision, list[str]]:
        """The prefill worker by the KV scorer, as `choose` does, and the peers to name: it,
        then the next cheapest as the decode worker's fallback."""
        assert self.block_size is not None
        overlaps = self.index.overlaps(request.block_ids, names)
        # No session affinity here: sessions pin their decode worker, never a prefill one.
        costs = worker_costs(
            self.config,
            {n: self.workers[n].load for n in names},
            overlaps,
            prompt_tokens=request.prompt_tokens,
            block_size=self.block_size,
        )
        worker = softmax_pick(costs, self.config.router_temperature, self.rng)
        reason = "kv" if len(names) > 1 else "only"
        decision = self._decision(request, worker, reason, overlaps, costs, 0.0)
        others = sorted((n for n in names if n != worker), key=costs.__getitem__)
        return decision, [worker, *others[:1]]

    # -- sessions ----------------------------------------------------------------------------------

    def _session_worker(self, session: str | None) -> str | None:
        if session is None:
            return None
        entry = self._sessions.get(session)
        if entry is None:
            return None
        worker, expiry = entry
        if expiry < self.clock() or worker not in self.workers:
            del self._sessions[session]
            return None
        return worker

    def _pin(self, session: str, worker: str) -> None:
        self._sessions[session] = (worker, self.clock() + self.config.session_ttl_s)
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.config.max_sessions:
            self._sessions.popitem(last=False)

    # -- request lifecycle -------------------------------------------------------------------

    def start(self, decision: Decision, request: RouteRequest) -> None:
        """The request is on its way to `decision.worker`: count its load there."""
        uncached = decision.prompt_tokens - decision.estimated_cached_tokens
        self._in_flight[decision.request_id] = self._open(decision, request, uncached)
        if request.session is not None:
            self._pin(request.session, decision.worker)

    def start_pair(self, pair: PairDecision, request: RouteRequest) -> None:
        """The request is on its way to `pair.decode.worker`, its KV to come from
        `pair.prefill.worker` (if any): count its load on both."""
        if pair.prefill is None:
            self.start(pair.decode, request)  # an aggregated request on a decode worker
            return
        # The decode worker prefills nothing; the prompt's KV lands there with the first token.
        self._in_flight[request.request_id] = self._open(pair.decode, request, 0)
        prefill = pair.prefill
        uncached = prefill.prompt_tokens - prefill.estimated_cached_tokens
        self._prefill_legs[request.request_id] = self._open(prefill, request, uncached)
        if request.session is not None:
            self._pin(request.session, pair.decode.worker)

    def _open(self, decision: Decision, request: RouteRequest, prefill_tokens: int) -> _InFlight:
        """Count a request's load on `decision.worker`, and the blocks it will cache there."""
        info = self.workers[decision.worker]
        info.load.active_requests += 1
        info.load.pending_prefill_tokens += prefill_tokens
        info.routed_total += 1
        self.index.predict(decision.worker, request.block_ids)
        return _InFlight(decision.worker, prefill_tokens, decision.prompt_tokens)

    def first_token(self, request_id: str) -> None:
        # The decode worker answers after the KV transfer: the prefill worker is done with it.
        leg = self._prefill_legs.pop(request_id, None)
        if leg is not None:
            self._release(leg)
        flight = self._in_flight.get(request_id)
        if flight is None or flight.prefilled:
            return
        flight.prefilled = True
        load = self.workers[flight.worker].load
        load.pending_prefill_tokens -= flight.prefill_tokens
        load.decode_tokens += flight.kv_tokens

    def tokens(self, request_id: str, count: int) -> None:
        """`count` more generated tokens now sit in the request's KV."""
        flight = self._in_flight.get(request_id)
        if flight is None:
            return
        if not flight.prefilled:
            self.first_token(request_id)
        flight.kv_tokens += count
        self.workers[flight.worker].load.decode_tokens += count

    def finish(self, request_id: str) -> None:
        for legs in (self._prefill_legs, self._in_flight):
            flight = legs.pop(request_id, None)
            if flight is not None:
                self._release(flight)

    def _release(self, flight: _InFlight) -> None:
        """Give back the load `flight` counted on its worker."""
        info = self.workers.get(flight.worker)
        if info is None:
            return
        load = info.load
        load.active_requests -= 1
        if flight.prefilled:
            load.decode_tokens -= flight.kv_tokens
        else:
            load.pending_prefill_tokens -= flight.prefill_tokens

    # -- queueing ------------------------------------------------------------------------------

    def must_queue(self, request: RouteRequest) -> bool:
        """Every candidate is saturated, so the request should wait (when queueing is on)."""
        names = self.candidates(request.exclude)
        return bool(names) and all(is_saturated(self.config, self.workers[n].load) for n in names)

    def enqueue(self, request: RouteRequest) -> None:
        if self.config.router_queue_policy == "wspt":
            # Smith's rule with equal weights: least uncached prefill (best-case) first.
            best = max(self.index.overlaps(request.block_ids).values(), default=0)
            key: tuple = (request.prompt_tokens - best * (self.block_size or 1),)
        else:
            key = ()
        heapq.heappush(self._queue, (key, next(self._queue_seq), request))

    def pool_load(self, pool: Callable[[str], bool] | None = None) -> PoolLoad:
        """The autoscaling signal of the workers this router knows (see `PoolLoad`), or of
        those `pool` accepts by name (disaggregated prefill and decode pools scale apart)."""
        tokens = requests = ready = 0
        for name, info in self.workers.items():
            if info.status == "down" or (pool is not None and not pool(name)):
                continue  # unreachable: what it holds is unknown, and it serves nothing new
            tokens += info.load.in_flight_tokens
            requests += info.load.requests
            ready += info.status == "ready"
        for _, _, queued in self._queue:
            tokens += queued.prompt_tokens
            requests += 1
        return PoolLoad(tokens, requests, ready)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def next_queued(self) -> RouteRequest | None:
        """The next queued request, if some worker has room for it now."""
        if not self._queue:
            return None
        request = self._queue[0][2]
        if self.must_queue(request):
            return None
        heapq.heappop(self._queue)
        return request

    def drop_queued(self, request_id: str) -> bool:
        """Take a request out of the queue (its client left); True if it was there."""
        for i, (_, _, queued) in enumerate(self._queue):
            if queued.request_id == request_id:
                self._queue.pop(i)
                heapq.heapify(self._queue)
                return True
        return False


def _worker_role(name: str, role: str) -> WorkerRole:
    for known in get_args(WorkerRole):
        if role == known:
            return known
    raise ValueError(
        f"worker {name} announces role {role!r}; expected one of {', '.join(get_args(WorkerRole))}"
    )
