"""The router's index (stored / removed events, gaps, resyncs, predictions), the cost function's
terms, the selection, sessions and the queue: pure logic, no processes."""

from __future__ import annotations

import random

import pytest

from bisllm_server.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    hash_token_blocks,
)
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.core import NoWorkerAvailable, Router, RouteRequest
from bisllm_server.router.index import IndexOutOfSync, KVIndex
from bisllm_server.router.scoring import (
    WorkerLoad,
    cost_terms,
    is_saturated,
    softmax_pick,
    worker_costs,
)

B = 4  # block size


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stored(tokens: list[int], parent_tokens: list[int] | None = None) -> BlockStored:
    """The event a worker publishes when it caches `tokens` after `parent_tokens`."""
    prefix = parent_tokens or []
    parent = hash_token_blocks(prefix, B)[-1] if prefix else None
    hashes = hash_token_blocks(prefix + tokens, B)[len(prefix) // B :]
    return BlockStored(hashes, parent, tokens, B)


PROMPT = list(range(100, 124))  # 6 blocks
IDS = hash_token_blocks(PROMPT, B)


# -- index ------------------------------------------------------------------------------------


def test_overlap_follows_stored_and_removed_events() -> None:
    index = KVIndex(predicted_ttl_s=0)
    index.add_worker("a")
    index.add_worker("b")
    index.apply("a", stored(PROMPT[:16]))  # 4 blocks
    index.apply("b", stored(PROMPT[:8]))  # 2 blocks
    assert index.overlaps(IDS) == {"a": 4, "b": 2}
    # Extending a's cached prefix by a child of its last block.
    index.apply("a", stored(PROMPT[16:24], PROMPT[:16]))
    assert index.overlaps(IDS)["a"] == 6
    # Eviction removes suffixes: the last two blocks.
    index.apply("a", BlockRemoved(IDS[4:]))
    assert index.overlaps(IDS) == {"a": 4, "b": 2}
    index.apply("b", AllBlocksCleared())
    assert index.overlaps(IDS) == {"a": 4, "b": 0}
    assert index.num_blocks("a") == 4


def test_overlap_stops_at_the_first_differing_block() -> None:
    index = KVIndex(predicted_ttl_s=0)
    index.add_worker("a")
    index.apply("a", stored(PROMPT))
    other = [*PROMPT[:8], 7, *PROMPT[9:]]  # differs inside block 2
    assert index.overlaps(hash_token_blocks(other, B)) == {"a": 2}
    # A prompt longer than anything cached, and an empty one.
    assert index.overlaps(hash_token_blocks(PROMPT + [1] * 8, B)) == {"a": 6}
    assert index.overlaps([]) == {"a": 0}


def test_stored_block_with_unknown_parent_means_a_lost_event() -> None:
    index = KVIndex()
    index.add_worker("a")
    with pytest.raises(IndexOutOfSync, match="parent"):
        index.apply("a", stored(PROMPT[8:16], PROMPT[:8]))  # the parent's event never came
    with pytest.raises(KeyError):
        index.apply("nobody", stored(PROMPT[:4]))


def test_resync_replaces_a_workers_blocks() -> None:
    index = KVIndex(predicted_ttl_s=0)
    index.add_worker("a")
    index.apply("a", stored(PROMPT[:8]))
    snapshot = [(IDS[0], None), (IDS[1], IDS[0]), (IDS[2], IDS[1])]
    index.replace("a", snapshot)
    assert index.blocks("a") == snapshot
    assert index.overlaps(IDS) == {"a": 3}
    with pytest.raises(IndexOutOfSync, match="before its parent"):
        index.replace("a", [(IDS[1], IDS[0]), (IDS[0], None)])


def test_predicted_blocks_count_until_they_expire() -> None:
    clock = Clock()
    index = KVIndex(predicted_ttl_s=10, clock=clock)
    index.add_worker("a")
    index.apply("a", stored(PROMPT[:4]))
    index.predict("a", IDS)
    assert index.overlaps(IDS) == {"a": 6}
    assert index.reported_overlap("a", IDS) == 1
    clock.now = 10.5
    assert index.overlaps(IDS) == {"a": 1}


# -- cost terms ----------------------------------------------------------------------------------


def test_cost_terms() -> None:
    config = RouterConfig(
        router_overlap_score_weight=2.0,
        router_decode_block_weight=1.0,
        router_prefill_token_discount=0.5,
        router_decode_token_discount=0.25,
        router_active_request_weight=3.0,
        router_session_affinity_score_multiplier=0.5,
    )
    load = WorkerLoad(active_requests=2, pending_prefill_tokens=16, decode_tokens=64)
    terms = cost_terms(config, load, prompt_tokens=40, overlap_blocks=6, block_size=B)
    # prefill: (40 - 24 uncached = 16 + 0.5 * 16 pending) / 4 = 6 blocks
    assert terms.prefill_blocks == pytest.approx(6.0)
    # decode: (0.25 * 64 + 40) / 4 = 14 blocks
    assert terms.decode_blocks == pytest.approx(14.0)
    assert terms.cost == pytest.approx(2.0 * 6 + 1.0 * 14 + 3.0 * 2)
    pinned = cost_terms(
        config, load, prompt_tokens=40, overlap_blocks=6, block_size=B, affinity=True
    )
    assert pinned.cost == pytest.approx(terms.cost * 0.5)
    # More cached blocks than the prompt has tokens never makes prefill negative.
    assert cost_terms(config, WorkerLoad(), prompt_tokens=8, overlap_blocks=5, block_size=B)
    assert (
        cost_terms(
            config, WorkerLoad(), prompt_tokens=8, overlap_blocks=5, block_size=B
        ).prefill_blocks
        == 0
    )


def test_worker_report_floors_the_decode_load() -> None:
    config = RouterConfig(router_decode_token_discount=1.0)
    seen = WorkerLoad(decode_tokens=10)
    busy = WorkerLoad(decode_tokens=10, reported_in_flight_tokens=410)  # traffic from elsewhere
    cheap = cost_terms(config, seen, prompt_tokens=4, overlap_blocks=0, block_size=B)
    dear = cost_terms(config, busy, prompt_tokens=4, overlap_blocks=0, block_size=B)
    assert dear.decode_blocks - cheap.decode_blocks == pytest.approx(400 / B)


def test_softmax_pick() -> None:
    rng = random.Random(0)
    costs = {"a": 10.0, "b": 11.0, "c": 30.0}
    assert softmax_pick(costs, 0, rng) == "a"
    picks = [softmax_pick(costs, 0.05, rng) for _ in range(2000)]
    # b is 1/20 of the range above a: exp(-1) as likely; c never.
    assert picks.count("c") == 0
    assert 0.2 < picks.count("b") / picks.count("a") < 0.55
    hot = [softmax_pick(costs, 100.0, rng) for _ in range(3000)]
    assert min(hot.count(n) for n in costs) > 800  # a high temperature spreads evenly
    ties = {softmax_pick({"a": 1.0, "b": 1.0}, 0.05, rng) for _ in range(50)}
    assert ties == {"a", "b"}
    with pytest.raises(ValueError):
        softmax_pick({}, 0.05, rng)


def test_saturation_threshold() -> None:
    load = WorkerLoad(pending_prefill_tokens=1500, max_num_tokens=1000)
    assert not is_saturated(RouterConfig(router_queue_threshold=None), load)
    assert not is_saturated(RouterConfig(router_queue_threshold=0), load)
    assert is_saturated(RouterConfig(router_queue_threshold=1.0), load)
    assert not is_saturated(RouterConfig(router_queue_threshold=2.0), load)


# -- the router --------------------------------------------------------------------------------


def make_router(policy: str = "kv", workers: int = 3, **knobs: object) -> Router:
    router = Router(RouterConfig(policy=policy, **knobs), rng=random.Random(1), clock=Clock())  # type: ignore[arg-type]
    for i in range(workers):
        router.add_worker(f"w{i}", block_size=B, max_num_tokens=64)
    return router


def request(rid: str, tokens: list[int], **kw: object) -> RouteRequest:
    return RouteRequest(rid, len(tokens), hash_token_blocks(tokens, B), **kw)  # type: ignore[arg-type]


def test_kv_policy_goes_to_the_cache_and_predicts_its_blocks() -> None:
    router = make_router()
    router.index.apply("w2", stored(PROMPT[:20]))
    decision = router.choose(request("r1", PROMPT))
    assert decision.worker == "w2" and decision.reason == "kv"
    assert decision.overlap_blocks == decision.best_overlap_blocks == 5
    assert decision.estimated_cached_tokens == 20
    router.start(decision, request("r1", PROMPT))
    load = router.workers["w2"].load
    assert (load.active_requests, load.pending_prefill_tokens) == (1, 4)
    # A new prompt follows the one just routed (predicted blocks) even before any event.
    other = list(range(500, 540))
    first = router.choose(request("r2", other))
    router.start(first, request("r2", other))
    again = router.choose(request("r3", other))
    assert again.worker == first.worker and again.overlap_blocks == 10


def test_load_moves_through_the_request_lifecycle() -> None:
    router = make_router(workers=1)
    decision = router.choose(request("r", PROMPT))
    router.start(decision, request("r", PROMPT))
    load = router.workers["w0"].load
    assert (load.pending_prefill_tokens, load.decode_tokens) == (24, 0)
    router.first_token("r")
    assert (load.pending_prefill_tokens, load.decode_tokens) == (0, 24)
    router.tokens("r", 5)
    assert load.decode_tokens == 29
    router.finish("r")
    assert (load.active_requests, load.pending_prefill_tokens, load.decode_tokens) == (0, 0, 0)
    router.finish("r")  # twice is harmless
    assert load.active_requests == 0


def test_balance_wins_over_a_small_hit() -> None:
    router = make_router(router_temperature=0)
    router.index.apply("w0", stored(PROMPT[:4]))  # one cached block
    router.workers["w0"].load.decode_tokens = 4000  # but a long decode backlog
    assert router.choose(request("r", PROMPT)).worker != "w0"


def test_round_robin_and_least_load() -> None:
    router = make_router("round_robin")
    router.index.apply("w1", stored(PROMPT))
    picks = [router.choose(request(f"r{i}", PROMPT)).worker for i in range(6)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]
    least = make_router("least_load")
    least.workers["w0"].load.decode_tokens = 50
    least.workers["w2"].load.decode_tokens = 10
    assert least.choose(request("r", PROMPT)).worker == "w1"


def test_session_affinity() -> None:
    hard = make_router(router_session_affinity_score_multiplier=0)
    first = hard.choose(request("r0", PROMPT, session="s"))
    hard.start(first, request("r0", PROMPT, session="s"))
    hard.workers[first.worker].load.decode_tokens = 10**6  # much busier now
    for i in range(5):
        decision = hard.choose(request(f"r{i + 1}", list(range(i * 50, i * 50 + 20)), session="s"))
        assert decision.worker == first.worker and decision.reason == "session"
    # A pinned worker that is draining gives way; the session moves.
    hard.set_status(first.worker, "draining")
    moved = hard.choose(request("r9", PROMPT, session="s"))
    assert moved.worker != first.worker
    # Soft affinity: the multiplier halves the pinned worker's cost.
    soft = make_router(router_temperature=0)
    base = soft.choose(request("x", PROMPT, session="t"))
    soft.start(base, request("x", PROMPT, session="t"))
    soft.finish("x")
    follow = soft.choose(request("y", list(range(900, 924)), session="t"))
    assert follow.worker == base.worker
    assert follow.costs[base.worker] == pytest.approx(
        0.5 * max(c for n, c in follow.costs.items() if n != base.worker), rel=0.2
    )


def test_excluded_and_down_workers_are_skipped() -> None:
    router = make_router()
    router.set_status("w0", "down")
    decision = router.choose(request("r", PROMPT, exclude=frozenset({"w1"})))
    assert decision.worker == "w2"
    with pytest.raises(NoWorkerAvailable, match="tried w1, w2"):
        router.choose(request("r", PROMPT, exclude=frozenset({"w1", "w2"})))


def test_removing_a_worker_reports_its_requests() -> None:
    router = make_router(workers=2, router_temperature=0)
    router.index.apply("w1", stored(PROMPT))
    decision = router.choose(request("r", PROMPT))
    router.start(decision, request("r", PROMPT))
    assert router.remove_worker("w1") == ["r"]
    router.finish("r")  # its request is forgotten with it: finishing it touches nothing
    assert router.workers["w0"].load.active_requests == 0
    assert router.choose(request("r2", PROMPT)).worker == "w0"


def test_block_sizes_must_agree() -> None:
    router = make_router(workers=1)
    with pytest.raises(ValueError, match="same config"):
        router.add_worker("odd", block_size=B * 2)


@pytest.mark.parametrize("policy", ["fcfs", "wspt"])
def test_queue_when_every_worker_is_saturated(policy: str) -> None:
    router = make_router(workers=2, router_queue_threshold=1.0, router_queue_policy=policy)
    big = list(range(1000, 1100))  # 100 uncached tokens > 1.0 * 64
    for i, worker in enumerate(("w0", "w1")):
        d = router.choose(request(f"big{i}", big[i:]))
        d.worker = worker
        router.start(d, request(f"big{i}", big[i:]))
    long_req = request("long", list(range(2000, 2080)))
    short_req = request("short", PROMPT)
    assert router.must_queue(long_req) and router.must_queue(short_req)
    router.enqueue(long_req)
    router.enqueue(short_req)
    assert router.queue_depth == 2
    assert router.next_queued() is None  # still saturated
    router.first_token("big0")  # w0's prefill is done: room again
    first = router.next_queued()
    assert first is not None
    assert first.request_id == ("long" if policy == "fcfs" else "short")
    assert router.drop_queued("short" if policy == "fcfs" else "long")
    assert router.queue_depth == 0


def test_stored_blocks_take_over_from_predictions() -> None:
    index = KVIndex(predicted_ttl_s=60, clock=Clock())
    index.add_worker("a")
    index.apply("a", stored(PROMPT[:4]))
    index.predict("a", IDS)
    # The worker stores the prompt: the predictions become reported blocks...
    index.apply("a", stored(PROMPT[4:24], PROMPT[:4]))
    assert index.overlaps(IDS) == {"a": 6}
    # ...so when it evicts them, the router believes the eviction at once, TTL or not.
    index.apply("a", BlockRemoved(IDS[2:]))
    assert index.overlaps(IDS) == {"a": 2}
    # A resync confirms what it lists; what it does not list stays predicted (in flight).
    index.predict("a", IDS)
    index.replace("a", [(IDS[0], None), (IDS[1], IDS[0]), (IDS[2], IDS[1])])
    assert index.reported_overlap("a", IDS) == 3
    assert index.overlaps(IDS) == {"a": 6}
    index.apply("a", AllBlocksCleared())
    assert index.overlaps(IDS) == {"a": 0}


def test_the_fast_cost_loop_agrees_with_the_terms() -> None:
    rng = random.Random(3)
    config = RouterConfig(router_active_request_weight=0.5)
    for _ in range(200):
        loads = {
            f"w{i}": WorkerLoad(
                active_requests=rng.randrange(10),
                pending_prefill_tokens=rng.randrange(5000),
                decode_tokens=rng.randrange(50000),
                reported_in_flight_tokens=rng.randrange(60000),
            )
            for i in range(4)
        }
        overlaps = {name: rng.randrange(40) for name in loads}
        prompt = rng.randrange(1, 600)
        fast = worker_costs(config, loads, overlaps, prompt_tokens=prompt, block_size=B,
                            pinned="w1")  # fmt: skip
        for name, load in loads.items():
            terms = cost_terms(config, load, prompt_tokens=prompt, overlap_blocks=overlaps[name],
                               block_size=B, affinity=name == "w1")  # fmt: skip
            assert fast[name] == pytest.approx(terms.cost)


def test_pool_load_sums_up_workers_and_the_router_queue() -> None:
    """The autoscaling signal: each worker's larger of routed and reported load, draining ones
    included and down ones not, plus the prompts queued in the router."""
    router = make_router(workers=4)
    router.workers["w0"].load.pending_prefill_tokens = 100  # routed here, not reported yet
    router.workers["w0"].load.active_requests = 1
    router.workers["w1"].load.reported_in_flight_tokens = 700  # traffic the router did not send
    router.workers["w1"].load.reported_requests = 3
    router.set_status("w2", "draining")
    router.workers["w2"].load.decode_tokens = 50
    router.workers["w2"].load.active_requests = 1
    router.set_status("w3", "down")
    router.workers["w3"].load.reported_in_flight_tokens = 10_000
    router.enqueue(request("queued", list(range(40))))
    assert router.pool_load() == (100 + 700 + 50 + 40, 1 + 3 + 1 + 1, 2)
    # A pool of some workers only (disaggregation scales prefill and decode apart); the
    # router's queue belongs to every pool.
    assert router.pool_load(lambda name: name in {"w1", "w2"}) == (700 + 50 + 40, 3 + 1 + 1, 1)
