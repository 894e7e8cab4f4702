"""Autoscaling live: `bisllm serve --workers 1..2 --autoscale` on the embedded model.

A burst of long prompts (more in-flight tokens than one replica's target) makes the planner
start a second worker process, which joins the router once its /health answers and then takes
requests. When the burst gives way to a light trickle, the planner drains a worker after the
window and the scale-down delay and retires it. Every request of both phases must complete in
full: none fails and none is cut off by the drain.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil
import pytest
import yaml
from server_fixtures import REPO, TINY_CONFIG
from test_router_live import Process, start_serve, wait_until

WORDS = ["river", "stone", "cloud", "maple", "lantern", "orbit", "velvet", "harbor", "copper"]
TARGET = 1500  # in-flight tokens per replica: a burst of 6 x ~500-token prompts is ~4 replicas
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    tmp = tmp_path_factory.mktemp("autoscale-live")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trt_llm"]["build"]["checkpoint_repository"]["repo"] = str(
        REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
    )
    config["trt_llm"]["runtime"]["max_batch_size"] = 2  # a burst queues: load one worker can't hold
    config["autoscaling_settings"] = {
        "min_replica": 1,
        "max_replica": 2,
        "autoscaling_window": 10,
        "scale_down_delay": 3,
        "max_scale_down_rate": 50,
    }
    config["additional_autoscaling_config"] = {
        "metrics": [{"name": "in_flight_tokens", "target": TARGET}]
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    process = start_serve(
        [str(path), "--workers", "1..2", "--autoscale", "--autoscale-interval", "0.5"],
        tmp / "serve.log",
    )
    try:
        wait_until(lambda: _pool(process)["actuator"]["serving"], 180, "the first worker")
        wait_until(lambda: process.get("/health")["workers_ready"] == 1, 180, "a ready worker")
        yield process
    finally:
        process.stop()


def _pool(process: Process) -> dict[str, Any]:
    if process.proc.poll() is not None:
        raise AssertionError(f"serve exited: {process.log.read_text()[-3000:]}")
    (pool,) = process.get("/router/autoscaler")["pools"]
    return pool


class Traffic:
    """Clients sending completions in a loop until told to stop, recording every outcome."""

    def __init__(self, url: str, clients: int, prompt_words: int, seed: int) -> None:
        self.url = url
        self.prompt_words = prompt_words
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.outcomes: list[tuple[int, str | None, int | None, str | None]] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=300) as client:
            while not self.stop.is_set():
                with self._lock:
                    words = [self.rng.choice(WORDS) for _ in range(self.prompt_words)]
                body = {
                    "prompt": f"Client {i}: " + " ".join(words),
                    "max_tokens": MAX_TOKENS,
                    "ignore_eos": True,
                    "temperature": 0,
                }
                response = client.post(self.url + "/v1/completions", json=body)
                outcome: tuple[int, str | None, int | None, str | None]
                if response.status_code == 200:
                    choice = response.json()["choices"][0]
                    outcome = (
                        200,
                        response.headers.get("x-bisllm-worker"),
                        response.json()["usage"]["completion_tokens"],
                        choice["finish_reason"],
                    )
                else:
                    outcome = (response.status_code, None, None, response.text[:300])
                with self._lock:
                    self.outcomes.append(outcome)

    def finish(self) -> list[tuple[int, str | None, int | None, str | None]]:
        self.stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        return self.outcomes

    def workers_served(self) -> set[str]:
        with self._lock:
            return {w for status, w, _, _ in self.outcomes if status == 200 and w}


def _children(process: Process) -> list[psutil.Process]:
    return [p for p in psutil.Process(process.proc.pid).children() if p.is_running()]


def test_burst_scales_up_then_back_down_without_losing_a_request(serve: Process) -> None:
    first = _pool(serve)["actuator"]["serving"]
    assert len(first) == 1 and len(_children(serve)) == 1

    burst = Traffic(serve.url, clients=6, prompt_words=400, seed=1)
    try:
        # The planner asks for a second replica and starts its process...
        pool = wait_until(
            lambda: (p := _pool(serve))["replicas"] == 2 and p, 60, "a scale-up decision"
        )
        decision = pool["last_decision"]
        assert decision["avg_in_flight_tokens"] > 1.1 * TARGET
        assert len(_children(serve)) == 2
        # ...which joins the router once healthy and takes part of the burst.
        wait_until(lambda: len(_pool(serve)["actuator"]["serving"]) == 2, 180, "a second worker")
        wait_until(lambda: len(burst.workers_served()) == 2, 120, "requests on both workers")
    finally:
        burst_outcomes = burst.finish()

    # A trickle (well under one replica's target) while the planner scales down: the drained
    # worker may hold requests, which must finish before it is retired.
    trickle = Traffic(serve.url, clients=2, prompt_words=150, seed=2)
    try:
        pool = wait_until(
            lambda: (p := _pool(serve))["actuator"]["retired_total"] == 1 and p,
            120,
            "a scale-down",
        )
        assert pool["replicas"] == 1 and len(pool["actuator"]["serving"]) == 1
        wait_until(lambda: len(_children(serve)) == 1, 60, "the retired worker's exit")
        served_after = len(trickle.outcomes)
        wait_until(lambda: len(trickle.outcomes) >= served_after + 2, 60, "trickle after")
    finally:
        trickle_outcomes = trickle.finish()

    for phase, outcomes in (("burst", burst_outcomes), ("trickle", trickle_outcomes)):
        assert outcomes, f"no {phase} request completed"
        bad = [o for o in outcomes if o[0] != 200 or o[2] != MAX_TOKENS or o[3] != "length"]
        assert not bad, f"{phase}: failed or cut-off requests: {bad[:5]}"
    events = _pool(serve)["scale_events"]
    assert events == 2, f"expected one scale-up and one scale-down, got {events} changes"
    metrics = httpx.get(serve.url + "/metrics", timeout=10).text
    assert 'autoscaler_rounded_desired_scale{model_name="bisllm-tiny-moe",pool="workers"} 1.0' in (
        metrics
    )


def test_autoscaler_metrics_are_exported(serve: Process) -> None:
    metrics = httpx.get(serve.url + "/metrics", timeout=10).text
    names = [
        "autoscaler_in_flight_tokens",
        "autoscaler_avg_in_flight_tokens",
        "autoscaler_avg_num_requests",
        "autoscaler_avg_num_workers",
        "autoscaler_desired_scale",
        "autoscaler_policy_desired_scale",
        "autoscaler_rounded_desired_scale",
    ]
    for name in names:
        assert f'{name}{{model_name="bisllm-tiny-moe",pool="workers"}}' in metrics, name
