"""Disaggregated autoscaling: the prefill and decode pools are sized apart, each on its own
in-flight tokens (a burst of long prompts grows the prefill pool and leaves the decode pool
alone; the decoding that follows grows the decode pool while the prefill pool shrinks back),
with one set of autoscaler_* series per pool."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bisllm_server.autoscaler.metrics import AutoscalerMetrics
from bisllm_server.autoscaler.planner import Planner
from bisllm_server.autoscaler.policy import Autoscaler, AutoscalerSettings
from bisllm_server.kv_events import hash_token_blocks
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.core import Router, RouteRequest

B = 16
TARGET = 2000.0  # in-flight tokens per worker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def planners(router: Router, clock: Clock, registry: CollectorRegistry) -> dict[str, Planner]:
    metrics = AutoscalerMetrics(registry, "m")
    settings = AutoscalerSettings(
        min_replica=1,
        max_replica=8,
        window_s=10.0,
        scale_down_delay_s=20.0,
        target=TARGET,
        max_scale_down_rate=100.0,
    )
    return {
        role: Planner(
            Autoscaler(settings, initial_replicas=1),
            lambda role=role: router.pool_load(router.members(role)),
            metrics,
            pool=role,
            clock=clock,
        )
        for role in ("prefill", "decode")
    }


def run(pools: dict[str, Planner], clock: Clock, seconds: float) -> dict[str, int]:
    """Tick both planners once a second; the replica counts each asks for at the end."""
    asked = {}
    end = clock.now + seconds
    while clock.now < end:
        clock.now += 1.0
        for role, planner in pools.items():
            asked[role] = planner.tick().rounded_desired_scale
    return asked


def test_prefill_and_decode_pools_scale_on_their_own_tokens():
    clock = Clock()
    config = RouterConfig(router_temperature=0, disagg_max_local_prefill_tokens=512)
    router = Router(config, rng=random.Random(0), clock=clock)
    router.add_worker("p0", block_size=B, role="prefill")
    router.add_worker("d0", block_size=B, role="decode")
    registry = CollectorRegistry()
    pools = planners(router, clock, registry)
    assert run(pools, clock, 5) == {"prefill": 1, "decode": 1}

    # Six 2,000-token prompts arrive, each prefilled remotely: 12,000 tokens owed by the
    # prefill pool, none by the decode pool yet.
    rids = []
    for i in range(6):
        prompt = [1000 * i + t for t in range(2000)]
        route = RouteRequest(f"r{i}", len(prompt), hash_token_blocks(prompt, B))
        pair = router.choose_pair(route)
        assert pair.mode == "remote" and pair.decode.worker == "d0"
        router.start_pair(pair, route)
        rids.append(route.request_id)
    assert router.pool_load(router.members("prefill")).in_flight_tokens == 12000
    assert router.pool_load(router.members("decode")).in_flight_tokens == 0
    asked = run(pools, clock, 15)  # a window full of the burst
    # (Up to the scale-up step's cap: the policy grows a pool of one by at most 4 at a time.)
    assert asked["prefill"] > 1 and asked["decode"] == 1
    grown = asked["prefill"]

    # Their first tokens arrive: the K/V now sits on the decode worker, which decodes on.
    for rid in rids:
        router.first_token(rid)
        router.tokens(rid, 50)
    assert router.pool_load(router.members("prefill")).in_flight_tokens == 0
    assert router.pool_load(router.members("decode")).in_flight_tokens == 6 * 2050
    asked = run(pools, clock, 40)  # past the window and the scale-down delay
    assert asked["decode"] > 1 and asked["prefill"] < grown

    # One set of series per pool, on one registry.
    pools_seen = {
        sample.labels["pool"]
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if sample.name == "autoscaler_in_flight_tokens"
    }
    assert pools_seen == {"prefill", "decode"}
