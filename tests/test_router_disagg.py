"""Disaggregated prefill/decode routing: the pair decision (a decode worker by load, a prefill
worker by KV unless the prompt is better prefilled locally), the load both legs count until
the first token and the end, and the router process forwarding the prefill peers to the
decode worker (scripted workers announcing their roles)."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from router_fakes import BODY, STREAM, FakeWorker
from server_fixtures import serve_app
from test_router_proxy import wait_until

from bisllm_server.kv_events import BlockStored, hash_token_blocks
from bisllm_server.openai.kv_event_stream import kv_event_lines
from bisllm_server.router.app import create_router_app
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.core import NoWorkerAvailable, Router, RouteRequest
from bisllm_server.router.prompts import PromptTokenizer
from bisllm_server.router.service import RouterOptions, RouterService

B = 4  # block size (the scripted workers' too)
PROMPT = list(range(100, 124))  # 6 blocks
IDS = hash_token_blocks(PROMPT, B)
LOCAL_MAX = 8  # disagg_max_local_prefill_tokens in these tests: two blocks


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stored(tokens: list[int]) -> BlockStored:
    """The event a worker publishes when it caches `tokens` from the start of a prompt."""
    return BlockStored(hash_token_blocks(tokens, B), None, tokens, B)


def request(rid: str, tokens: list[int], **kw: Any) -> RouteRequest:
    return RouteRequest(rid, len(tokens), hash_token_blocks(tokens, B), **kw)


def make_router(prefill: int = 2, decode: int = 2, **knobs: Any) -> Router:
    """Prefill workers p0.., decode workers d0..; the cheapest prefill worker always wins."""
    config = RouterConfig(router_temperature=0, disagg_max_local_prefill_tokens=LOCAL_MAX, **knobs)
    router = Router(config, rng=random.Random(1), clock=Clock())
    for i in range(prefill):
        router.add_worker(f"p{i}", block_size=B, role="prefill")
    for i in range(decode):
        router.add_worker(f"d{i}", block_size=B, role="decode")
    return router


def loads(router: Router, name: str) -> tuple[int, int, int]:
    load = router.workers[name].load
    return load.active_requests, load.pending_prefill_tokens, load.decode_tokens


# -- workers and roles -------------------------------------------------------------------------


def test_roles_are_checked_kept_and_updated() -> None:
    router = Router(RouterConfig())
    with pytest.raises(ValueError, match="'mixed'"):
        router.add_worker("x", block_size=B, role="mixed")
    # A refused worker leaves no trace: not known, and it fixed no block size.
    assert router.workers == {} and router.block_size is None
    router.add_worker("a", block_size=B)
    assert router.workers["a"].role == "both" and not router.disaggregated
    router.add_worker("b", block_size=B, role="decode")
    assert router.disaggregated
    assert router.candidates() == ["a", "b"]
    assert router.candidates(role="decode") == ["b"]
    assert router.candidates(role="both") == ["a"]
    assert router.candidates(role="prefill") == []
    # Re-adding (a restarted worker's hello) updates the role.
    router.add_worker("b", block_size=B, role="prefill")
    assert router.candidates(role="prefill") == ["b"] and router.candidates(role="decode") == []
    is_prefill = router.members("prefill")
    assert is_prefill("b") and not is_prefill("a") and not is_prefill("nobody")
    router.remove_worker("b")
    assert not router.disaggregated and not is_prefill("b")


# -- choosing a pair ---------------------------------------------------------------------------


def test_a_short_uncached_part_is_prefilled_on_the_least_loaded_decode_worker() -> None:
    router = make_router()
    router.workers["d0"].load.decode_tokens = 100  # d1 is the least loaded
    router.index.apply("p0", stored(PROMPT))  # a prefill worker holding all of it changes nothing
    router.index.apply("d1", stored(PROMPT[:16]))  # 24 - 16 = 8 uncached tokens on d1
    pair = router.choose_pair(request("r", PROMPT))
    assert (pair.mode, pair.reason, pair.prefill, pair.prefill_peers) == (
        "local",
        "short_prompt",
        None,
        [],
    )
    assert pair.decode.worker == "d1" and pair.decode.reason == "decode"
    assert pair.decode.estimated_cached_tokens == 16
    router.start_pair(pair, request("r", PROMPT))
    # The decode worker prefills the uncached part itself; no prefill worker is involved.
    assert loads(router, "d1") == (1, 8, 0)
    assert loads(router, "p0") == loads(router, "p1") == (0, 0, 0)
    router.first_token("r")
    assert loads(router, "d1") == (1, 0, 24)
    router.finish("r")
    assert loads(router, "d1") == (0, 0, 0)
    # The limit is on uncached tokens: one more than it is worth a prefill worker.
    assert router.choose_pair(request("r2", list(range(900, 908)))).reason == "short_prompt"
    assert router.choose_pair(request("r3", list(range(900, 909)))).reason == "remote"


def test_a_long_prompt_goes_to_the_prefill_worker_holding_its_prefix() -> None:
    router = make_router(prefill=3)
    router.index.apply("p1", stored(PROMPT[:20]))  # 5 blocks: cheapest
    router.index.apply("p2", stored(PROMPT[:8]))  # 2 blocks: next cheapest
    router.index.apply("d0", stored(PROMPT[:20]))  # the decode worker's cache does not pull...
    router.workers["d0"].load.decode_tokens = 100  # ...against its load
    pair = router.choose_pair(request("r", PROMPT))
    assert (pair.mode, pair.reason) == ("remote", "remote")
    assert pair.decode.worker == "d1" and pair.decode.reason == "decode"
    assert pair.decode.best_overlap_blocks == 5  # d0's, among the decode workers
    assert pair.prefill is not None
    assert (pair.prefill.worker, pair.prefill.reason, pair.prefill.overlap_blocks) == (
        "p1",
        "kv",
        5,
    )
    assert set(pair.prefill.costs) == {"p0", "p1", "p2"}
    # The chosen prefill worker first, then one fallback: the next cheapest.
    assert pair.prefill_peers == ["p1", "p2"]
    assert pair.decode.decision_seconds == pair.prefill.decision_seconds > 0


def test_a_single_prefill_worker_is_the_only_choice() -> None:
    router = make_router(prefill=1)
    pair = router.choose_pair(request("r", PROMPT))
    assert pair.prefill is not None and pair.prefill.reason == "only"
    assert pair.prefill_peers == ["p0"]


def test_busy_prefill_workers_mean_a_local_prefill() -> None:
    router = make_router(disagg_max_prefill_queue=2)
    router.workers["p0"].load.active_requests = 2  # the router's own count
    router.workers["p1"].load.reported_requests = 1  # the worker's report
    assert router.choose_pair(request("r", PROMPT)).reason == "remote"  # p1 has room
    router.workers["p1"].load.reported_requests = 5
    pair = router.choose_pair(request("r", PROMPT))
    assert (pair.mode, pair.reason, pair.prefill_peers) == ("local", "prefill_busy", [])
    # 0 turns the check off.
    router.config.disagg_max_prefill_queue = 0
    assert router.choose_pair(request("r", PROMPT)).reason == "remote"


def test_no_ready_prefill_worker_means_a_local_prefill() -> None:
    router = make_router()
    router.set_status("p0", "down")
    router.set_status("p1", "draining")
    pair = router.choose_pair(request("r", PROMPT))
    assert (pair.mode, pair.reason, pair.prefill) == ("local", "no_prefill_worker", None)
    assert make_router(prefill=0).choose_pair(request("r", PROMPT)).reason == "no_prefill_worker"


def test_without_a_decode_worker_nothing_can_be_placed() -> None:
    router = make_router(decode=0)
    router.add_worker("both", block_size=B)  # an aggregated worker is no decode worker
    with pytest.raises(NoWorkerAvailable, match="no decode worker"):
        router.choose_pair(request("r", PROMPT))
    router = make_router()
    with pytest.raises(NoWorkerAvailable, match="tried d0, d1"):
        router.choose_pair(request("r", PROMPT, exclude=frozenset({"d0", "d1"})))


def test_excluded_workers_are_skipped() -> None:
    router = make_router()
    router.workers["d0"].load.decode_tokens = 100
    router.index.apply("p1", stored(PROMPT))
    pair = router.choose_pair(request("r", PROMPT, exclude=frozenset({"d1", "p1"})))
    assert pair.decode.worker == "d0"
    assert pair.prefill is not None and pair.prefill_peers == ["p0"]


def test_a_session_keeps_its_decode_worker_under_hard_affinity() -> None:
    router = make_router(router_session_affinity_score_multiplier=0)
    first = router.choose_pair(request("r0", PROMPT, session="s"))
    router.start_pair(first, request("r0", PROMPT, session="s"))
    pinned = first.decode.worker
    router.workers[pinned].load.decode_tokens = 10**6  # much busier now
    again = router.choose_pair(request("r1", PROMPT, session="s"))
    assert again.decode.worker == pinned and again.decode.reason == "session"
    # Soft affinity (the default): the decode worker is the least loaded one.
    soft = make_router()
    first = soft.choose_pair(request("r0", PROMPT, session="s"))
    soft.start_pair(first, request("r0", PROMPT, session="s"))
    soft.workers[first.decode.worker].load.decode_tokens = 10**6
    assert soft.choose_pair(request("r1", PROMPT, session="s")).decode.worker != first.decode.worker


# -- the load of a pair ------------------------------------------------------------------------


def start_remote(router: Router, rid: str = "r", tokens: list[int] = PROMPT) -> tuple[str, str]:
    """Route a 24-token prompt with 4 blocks cached on p1: (decode worker, prefill worker)."""
    router.index.apply("p1", stored(tokens[:16]))
    pair = router.choose_pair(request(rid, tokens))
    assert pair.prefill is not None and pair.prefill.worker == "p1"
    router.start_pair(pair, request(rid, tokens))
    return pair.decode.worker, pair.prefill.worker


def test_the_prefill_leg_counts_until_the_first_token() -> None:
    router = make_router()
    prefill_pool, decode_pool = router.members("prefill"), router.members("decode")
    decode, prefill = start_remote(router)
    # The prefill worker computes the 8 uncached tokens; the decode worker waits for the KV.
    assert loads(router, prefill) == (1, 8, 0)
    assert loads(router, decode) == (1, 0, 0)
    assert router.workers[prefill].routed_total == router.workers[decode].routed_total == 1
    assert router.pool_load(prefill_pool) == (8, 1, 2)
    assert router.pool_load(decode_pool) == (0, 1, 2)
    # Both will hold the prompt's blocks: the next request sharing it finds them.
    assert router.index.overlaps(IDS, [decode, prefill]) == {decode: 6, prefill: 6}
    router.first_token("r")
    assert router.pool_load(prefill_pool) == (0, 0, 2)
    assert router.pool_load(decode_pool) == (24, 1, 2)
    router.tokens("r", 3)
    assert loads(router, decode) == (1, 0, 27)
    router.finish("r")
    assert router.pool_load(prefill_pool) == router.pool_load(decode_pool) == (0, 0, 2)
    router.finish("r")  # twice is harmless
    assert loads(router, prefill) == loads(router, decode) == (0, 0, 0)


def test_generated_tokens_end_the_prefill_leg_too() -> None:
    router = make_router()
    decode, prefill = start_remote(router)
    router.tokens("r", 2)  # output seen without an explicit first token
    assert loads(router, prefill) == (0, 0, 0)
    assert loads(router, decode) == (1, 0, 26)


def test_finishing_before_the_first_token_releases_both_legs() -> None:
    router = make_router()
    decode, prefill = start_remote(router)
    router.finish("r")  # the decode worker failed, or the client left
    assert loads(router, prefill) == loads(router, decode) == (0, 0, 0)
    assert router.pool_load() == (0, 0, 4)


def test_removing_the_prefill_worker_drops_its_leg() -> None:
    router = make_router()
    decode, prefill = start_remote(router)
    # Not a lost request: its decode worker prefills locally when the pull fails.
    assert router.remove_worker(prefill) == []
    router.add_worker(prefill, block_size=B, role="prefill")  # back, with nothing routed
    router.first_token("r")
    router.finish("r")
    assert loads(router, prefill) == loads(router, decode) == (0, 0, 0)
    # The decode worker's requests are the ones lost with it.
    decode, prefill = start_remote(router, "r2", list(range(300, 324)))
    assert router.remove_worker(decode) == ["r2"]
    router.finish("r2")
    assert loads(router, prefill) == (0, 0, 0)


# -- the router process ------------------------------------------------------------------------


async def announcing(lines: AsyncIterator[bytes], role: str | None) -> AsyncIterator[bytes]:
    """The worker's event stream with `role` in its hello line (the first one); None: no role
    key at all, as workers that predate disaggregation send."""
    hello = json.loads(await anext(lines))
    if role is None:
        hello.pop("role", None)
    else:
        hello["role"] = role
    yield (json.dumps(hello) + "\n").encode()
    async for line in lines:
        yield line


@dataclass
class RoleWorker(FakeWorker):
    role: str | None = None  # None: a hello without a role key, as before disaggregation

    def app(self) -> FastAPI:
        app = super().app()
        routes = app.router.routes
        routes[:] = [r for r in routes if getattr(r, "path", None) != "/kv_events"]

        @app.get("/kv_events")
        async def kv_events(since: int | None = None, instance: str | None = None) -> Response:
            load = {"in_flight_tokens": 0, "prompt_tokens_total": 0, "cached_tokens_total": 0}
            lines = kv_event_lines(self.log, lambda: load, since, instance, load_interval=0.2)
            return StreamingResponse(
                announcing(lines, self.role), media_type="application/x-ndjson"
            )

        return app


@contextmanager
def role_workers(*roles: str | None) -> Iterator[list[RoleWorker]]:
    workers = [RoleWorker(f"w{i}", role=role) for i, role in enumerate(roles)]
    with ExitStack() as stack:
        for worker in workers:
            worker.url = stack.enter_context(serve_app(worker.app()))
        yield workers


def address(worker: FakeWorker) -> str:
    return worker.url.removeprefix("http://")


@contextmanager
def running_router(workers: list[RoleWorker], **knobs: Any) -> Iterator[tuple[str, RouterService]]:
    options = RouterOptions(
        workers=",".join(address(w) for w in workers),
        served_model_name="fake",
        heartbeat_timeout_s=2.0,
        health_interval_s=0.2,
    )
    config = RouterConfig(disagg_max_local_prefill_tokens=LOCAL_MAX, **knobs)
    service = RouterService(config, options, PromptTokenizer(None))
    with serve_app(create_router_app(service)) as url:
        wait_until(
            lambda: httpx.get(f"{url}/health").json()["workers_ready"] == len(workers),
            what="workers ready",
        )
        yield url, service


def complete(url: str, prompt: list[int], *, stream: bool = False) -> httpx.Response:
    body = {"model": "fake", "prompt": prompt, "max_tokens": 3, "stream": stream}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30)


def test_the_router_sends_decode_workers_the_prefill_peers() -> None:
    with (
        role_workers("prefill", "decode") as (prefill, decode),
        running_router([prefill, decode]) as (url, service),
    ):
        report = httpx.get(f"{url}/router/workers").json()["workers"]
        assert {w["address"]: w["role"] for w in report} == {
            address(prefill): "prefill",
            address(decode): "decode",
        }
        # A long prompt: prefilled on the prefill worker, decoded on the decode worker.
        long = complete(url, PROMPT)
        assert long.status_code == 200 and long.content == BODY
        sent = decode.requests[-1][1]
        assert sent["x-bisllm-prefill-peers"] == address(prefill)
        assert prefill.requests == []  # the decode worker pulls the KV, not the router
        assert long.headers["x-bisllm-worker"] == address(decode)
        assert long.headers["x-bisllm-route-reason"] == "decode"
        assert long.headers["x-bisllm-prefill-worker"] == address(prefill)
        assert long.headers["x-bisllm-disagg-reason"] == "remote"
        # A short one: the decode worker prefills it, told of no peers.
        short = complete(url, PROMPT[:LOCAL_MAX])
        assert short.status_code == 200 and len(decode.requests) == 2
        assert "x-bisllm-prefill-peers" not in decode.requests[-1][1]
        assert short.headers["x-bisllm-prefill-worker"] == "local"
        assert short.headers["x-bisllm-disagg-reason"] == "short_prompt"
        # Streamed: the first token ended the prefill worker's share before any byte
        # reached the client.
        streamed = complete(url, list(range(500, 540)), stream=True)
        assert streamed.content == b"".join(STREAM)
        assert streamed.headers["x-bisllm-disagg-reason"] == "remote"
        assert loads(service.router, address(prefill)) == (0, 0, 0)
        decisions = {
            (sample.labels["mode"], sample.labels["reason"]): sample.value
            for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
            for sample in family.samples
            if sample.name == "bisllm_router_disagg_decisions_total"
        }
        assert decisions == {("remote", "remote"): 2, ("local", "short_prompt"): 1}


def test_a_failed_decode_worker_is_retried_on_another_with_the_same_peers() -> None:
    with role_workers("prefill", "decode", "decode") as workers:
        prefill, bad, good = workers
        bad.mode = "503"
        with running_router(workers) as (url, service):
            service.router.rng = random.Random(0)
            # The decode worker is the least loaded, ties broken at random: send until the
            # failing one has been tried (each request tries it with probability 1/2). Each
            # prompt is new, so no decode worker holds it and every one is prefilled remotely.
            for i in range(12):
                response = complete(url, list(range(1000 * i, 1000 * i + 24)))
                assert response.status_code == 200
                assert response.headers["x-bisllm-worker"] == address(good)
                assert good.requests[-1][1]["x-bisllm-prefill-peers"] == address(prefill)
                if bad.requests:
                    break
            assert bad.requests, "the failing decode worker was never tried"
            assert bad.requests[-1][1]["x-bisllm-prefill-peers"] == address(prefill)
            assert service.metrics.totals["retries"] >= 1


def test_workers_without_a_role_are_served_as_before() -> None:
    with role_workers(None) as (worker,), running_router([worker]) as (url, service):
        assert not service.router.disaggregated
        response = complete(url, PROMPT)
        assert response.content == BODY
        assert response.headers["x-bisllm-route-reason"] == "only"
        assert "x-bisllm-disagg-reason" not in response.headers
        assert "x-bisllm-prefill-peers" not in worker.requests[-1][1]
        assert httpx.get(f"{url}/router/workers").json()["workers"][0]["role"] == "both"
