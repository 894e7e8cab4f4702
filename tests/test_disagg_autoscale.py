"""Disaggregated autoscaling: the prefill and decode pools are sized apart, each on its own
in-flight tokens (a burst of long prompts grows the prefill pool and leaves the decode pool
alone; the decoding that follows grows the decode pool while the prefill pool shrinks back),
with one set of autoscaler_* series per pool; live, each pool's planner starts workers of
its own role."""

from __future__ import annotations

import random
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import REPO, TINY_CONFIG
from test_autoscaler_live import MAX_TOKENS, Traffic
from test_router_live import start_serve, wait_until

from bisllm_server.autoscaler.metrics import AutoscalerMetrics
from bisllm_server.autoscaler.planner import Planner
from bisllm_server.autoscaler.policy import Autoscaler, AutoscalerSettings
from bisllm_server.kv_events import hash_token_blocks
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.core import Router, RouteRequest

B = 16
TARGET = 2000.0  # in-flight tokens per worker
EMBEDDED = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
LIVE_TARGET = 1500  # a burst of 6 x ~500-token prompts is more than one worker per pool


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


def test_a_disaggregated_unit_scales_each_pool_with_workers_of_its_role(tmp_path):
    """`bisllm serve --disaggregated --autoscale` (1P:1D units, 1..2): a burst of long prompts
    makes each pool's planner start a second worker of its own role, which joins the router
    announcing that role; every request completes."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trt_llm"]["build"]["checkpoint_repository"]["repo"] = str(EMBEDDED)
    config["trt_llm"]["runtime"]["max_batch_size"] = 2
    config["autoscaling_settings"] = {
        "min_replica": 1,
        "max_replica": 2,
        "autoscaling_window": 10,
        "scale_down_delay": 600,
    }
    config["additional_autoscaling_config"] = {
        "metrics": [{"name": "in_flight_tokens", "target": LIVE_TARGET}]
    }
    config["llm_config"] = {
        "is_disaggregated": True,
        "b10_disagg_config": {"prefill_workers_per_replica": 1, "decode_workers_per_replica": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = start_serve(
        [str(path), "--disaggregated", "--autoscale", "--autoscale-interval", "0.5",
         "--max-local-prefill-tokens", "64"],
        tmp_path / "serve.log",
    )  # fmt: skip

    def pools() -> dict[str, dict[str, Any]]:
        if serve.proc.poll() is not None:
            raise AssertionError(f"serve exited: {serve.log.read_text()[-3000:]}")
        return {p["pool"]: p for p in serve.get("/router/autoscaler")["pools"]}

    def serving(role: str) -> list[str]:
        return pools()[role]["actuator"]["serving"]

    try:
        wait_until(lambda: serve.get("/health")["workers_ready"] == 2, 180, "the first unit")
        assert {p["mode"] for p in pools().values()} == {"actuating"}
        burst = Traffic(serve.url, clients=6, prompt_words=400, seed=3)
        try:
            for role in ("prefill", "decode"):
                wait_until(lambda role=role: len(serving(role)) == 2, 240, f"a 2nd {role} worker")

            def roles_announced() -> bool:  # once each new worker's KV stream said hello
                workers = serve.get("/router/workers")["workers"]
                roles = {w["address"]: w["role"] for w in workers if w["status"] == "ready"}
                return all(
                    [roles.get(a) for a in serving(role)] == [role, role]
                    for role in ("prefill", "decode")
                )

            wait_until(roles_announced, 60, "the new workers' roles")
        finally:
            outcomes = burst.finish()
        assert outcomes and all(status == 200 for status, *_ in outcomes), outcomes[:3]
        assert all(tokens == MAX_TOKENS for _, _, tokens, _ in outcomes)
    finally:
        serve.stop()
