"""`ServerMetrics`: the `/metrics` exposition, read back the way Prometheus reads it.

Every check parses `render()` with prometheus_client's own text parser, so names, types and
labels are what a scraper (and the KEDA query in the k8s package) would see.
"""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from bisllm_server.engine.stats import EngineStats
from bisllm_server.openai.metrics import ServerMetrics, gpu_sample
from bisllm_truss.package.render import PackageOptions, render_package
from bisllm_truss.validate import validate_file

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qwen3-moe"

# The spec's seed metrics (§5) and the type each is exposed as.
SEED_TYPES = {
    "tps_per_request": "histogram",
    "input_tokens": "counter",
    "output_tokens": "counter",
    "input_tokens_per_request": "histogram",
    "output_tokens_per_request": "histogram",
    "concurrent_requests": "gauge",
    "speculation_rate": "gauge",
    "cpu_usage": "gauge",
    "memory_usage": "gauge",
    "gpu_usage": "gauge",
    "gpu_memory_usage": "gauge",
    "replica_count_by_status": "gauge",
}
OUR_TYPES = {
    "bisllm_time_to_first_token_seconds": "histogram",
    "bisllm_inter_token_latency_seconds": "histogram",
    "bisllm_e2e_request_latency_seconds": "histogram",
    "bisllm_num_requests_waiting": "gauge",
    "bisllm_num_requests_running": "gauge",
    "bisllm_kv_cache_usage": "gauge",
    "bisllm_prefix_cache_hit_rate": "gauge",
    "bisllm_in_flight_tokens": "gauge",
    "bisllm_spec_accept_length": "gauge",
    "bisllm_cached_tokens": "counter",
    "bisllm_requests": "counter",
    "bisllm_http_errors": "counter",
}

STATS = EngineStats(
    step=7,
    num_running=3,
    num_waiting=5,
    kv_pages_total=100,
    kv_pages_used=60,
    kv_pages_free=40,
    kv_pages_cached=30,
    kv_pages_evictable=20,
    page_size=16,
    prefill_tokens=12,
    decode_tokens=3,
    in_flight_tokens=4321,
    cached_tokens=8,
    prompt_tokens_total=400,
    generation_tokens_total=90,
    cached_tokens_total=100,
    num_retractions_total=0,
    num_finished_total=4,
    spec_draft_tokens_total=40,
    spec_accepted_tokens_total=30,
    spec_verify_steps_total=12,
    step_seconds=0.02,
    schedule_seconds=0.001,
    forward_seconds=0.015,
)


def families(metrics: ServerMetrics) -> dict[str, Any]:
    body, _ = metrics.render()
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(metrics: ServerMetrics, sample: str, **labels: str) -> float:
    """The one sample named `sample` whose labels are `labels` plus this model's name."""
    want = {"model_name": metrics.model_name, **labels}
    found = [
        s.value
        for f in families(metrics).values()
        for s in f.samples
        if s.name == sample and s.labels == want
    ]
    assert len(found) == 1, f"{sample}{want}: {len(found)} samples"
    return found[0]


def bucket(metrics: ServerMetrics, name: str, le: str) -> float:
    return value(metrics, f"{name}_bucket", le=le)


# --------------------------------------------------------------------------------------------
# exposition


@pytest.mark.parametrize(("name", "kind"), sorted({**SEED_TYPES, **OUR_TYPES}.items()))
def test_metric_is_exposed_with_its_type(name: str, kind: str) -> None:
    found = families(ServerMetrics(MODEL))
    assert name in found, f"{name} missing from /metrics"
    assert found[name].type == kind


def test_counters_use_the_total_suffix() -> None:
    # The family keeps the spec's name; the series a PromQL query names gets `_total`.
    found = families(ServerMetrics(MODEL))
    for name in ("input_tokens", "output_tokens"):
        assert {s.name for s in found[name].samples} == {f"{name}_total"}


def test_every_sample_carries_the_model_name() -> None:
    metrics = ServerMetrics(MODEL)
    for family in families(metrics).values():
        for sample in family.samples:
            assert sample.labels.get("model_name") == MODEL, (family.name, sample)


def test_render_returns_prometheus_text() -> None:
    body, content_type = ServerMetrics(MODEL).render()
    assert isinstance(body, bytes)
    assert content_type.startswith("text/plain")
    assert b"# TYPE bisllm_in_flight_tokens gauge" in body


def test_fresh_server_exposes_zeros() -> None:
    metrics = ServerMetrics(MODEL)
    assert value(metrics, "concurrent_requests") == 0
    assert value(metrics, "speculation_rate") == 0
    assert value(metrics, "bisllm_spec_accept_length") == 0
    assert value(metrics, "input_tokens_total") == 0
    assert value(metrics, "bisllm_in_flight_tokens") == 0
    assert value(metrics, "bisllm_requests_total", finish_reason="stop") == 0
    assert value(metrics, "tps_per_request_count") == 0


# --------------------------------------------------------------------------------------------
# hooks


def test_request_lifecycle_moves_every_series() -> None:
    metrics = ServerMetrics(MODEL)
    metrics.request_started()
    assert value(metrics, "concurrent_requests") == 1

    metrics.first_token(0.2)
    assert value(metrics, "bisllm_time_to_first_token_seconds_count") == 1
    assert value(metrics, "bisllm_time_to_first_token_seconds_sum") == pytest.approx(0.2)

    metrics.tokens_emitted(4, 0.2)  # four observations of 0.05 s
    name = "bisllm_inter_token_latency_seconds"
    assert value(metrics, f"{name}_count") == 4
    assert value(metrics, f"{name}_sum") == pytest.approx(0.2)
    assert bucket(metrics, name, "0.04") == 0
    assert bucket(metrics, name, "0.06") == 4

    metrics.request_finished(
        prompt_tokens=10, output_tokens=20, cached_tokens=6, duration_s=2.0, finish_reason="stop"
    )
    assert value(metrics, "concurrent_requests") == 0
    assert value(metrics, "input_tokens_total") == 10
    assert value(metrics, "output_tokens_total") == 20
    assert value(metrics, "bisllm_cached_tokens_total") == 6
    assert value(metrics, "input_tokens_per_request_sum") == 10
    assert value(metrics, "input_tokens_per_request_count") == 1
    assert value(metrics, "output_tokens_per_request_sum") == 20
    assert value(metrics, "output_tokens_per_request_count") == 1
    assert value(metrics, "bisllm_e2e_request_latency_seconds_sum") == pytest.approx(2.0)
    assert value(metrics, "tps_per_request_count") == 1
    assert value(metrics, "tps_per_request_sum") == pytest.approx(10.0)
    assert bucket(metrics, "tps_per_request", "5.0") == 0
    assert bucket(metrics, "tps_per_request", "10.0") == 1
    assert value(metrics, "bisllm_requests_total", finish_reason="stop") == 1
    assert value(metrics, "bisllm_requests_total", finish_reason="length") == 0


def test_counters_accumulate_across_requests() -> None:
    metrics = ServerMetrics(MODEL)
    for prompt, output in ((3, 5), (7, 11)):
        metrics.request_started()
        metrics.request_finished(prompt, output, 0, 1.0, "length")
    assert value(metrics, "input_tokens_total") == 10
    assert value(metrics, "output_tokens_total") == 16
    assert value(metrics, "input_tokens_per_request_count") == 2
    assert value(metrics, "bisllm_requests_total", finish_reason="length") == 2


def test_request_without_output_has_no_speed() -> None:
    metrics = ServerMetrics(MODEL)
    metrics.request_started()
    metrics.request_finished(12, 0, 0, 0.5, "error")
    assert value(metrics, "tps_per_request_count") == 0
    assert value(metrics, "output_tokens_per_request_count") == 1
    assert value(metrics, "bisllm_e2e_request_latency_seconds_count") == 1
    assert value(metrics, "bisllm_requests_total", finish_reason="error") == 1
    assert value(metrics, "concurrent_requests") == 0


def test_empty_chunk_observes_nothing() -> None:
    metrics = ServerMetrics(MODEL)
    metrics.tokens_emitted(0, 0.3)
    assert value(metrics, "bisllm_inter_token_latency_seconds_count") == 0


def test_request_failed_counts_by_status_only() -> None:
    metrics = ServerMetrics(MODEL)
    metrics.request_failed(503)
    metrics.request_failed(503)
    metrics.request_failed(400)
    assert value(metrics, "bisllm_http_errors_total", status="503") == 2
    assert value(metrics, "bisllm_http_errors_total", status="400") == 1
    # An error before request_started must not push the in-flight count below zero.
    assert value(metrics, "concurrent_requests") == 0


def test_set_status_marks_exactly_one() -> None:
    metrics = ServerMetrics(MODEL)
    assert value(metrics, "replica_count_by_status", status="starting") == 1
    assert value(metrics, "replica_count_by_status", status="active") == 0
    metrics.set_status("active")
    assert value(metrics, "replica_count_by_status", status="starting") == 0
    assert value(metrics, "replica_count_by_status", status="active") == 1
    metrics.set_status("draining")
    statuses = {
        s.labels["status"]: s.value for s in families(metrics)["replica_count_by_status"].samples
    }
    assert statuses == {"starting": 0, "active": 0, "draining": 1}


# --------------------------------------------------------------------------------------------
# engine gauges


def test_update_engine_sets_the_gauges() -> None:
    metrics = ServerMetrics(MODEL)
    metrics.update_engine(STATS)
    assert value(metrics, "bisllm_num_requests_waiting") == 5
    assert value(metrics, "bisllm_num_requests_running") == 3
    assert value(metrics, "bisllm_in_flight_tokens") == 4321
    # 60 used pages, 20 of them evictable prefix cache: 40 of 100 are held.
    assert value(metrics, "bisllm_kv_cache_usage") == pytest.approx(0.4)
    assert value(metrics, "bisllm_prefix_cache_hit_rate") == pytest.approx(0.25)
    assert value(metrics, "speculation_rate") == pytest.approx(0.75)  # 30 of 40 drafts
    assert value(metrics, "bisllm_spec_accept_length") == pytest.approx((30 + 12) / 12)

    metrics.update_engine(replace(STATS, num_waiting=0, in_flight_tokens=0))
    assert value(metrics, "bisllm_num_requests_waiting") == 0
    assert value(metrics, "bisllm_in_flight_tokens") == 0


def test_update_engine_before_any_work() -> None:
    metrics = ServerMetrics(MODEL)
    metrics.update_engine(
        replace(
            STATS,
            kv_pages_total=0,
            kv_pages_used=0,
            kv_pages_evictable=0,
            prompt_tokens_total=0,
            cached_tokens_total=0,
            spec_draft_tokens_total=0,
            spec_accepted_tokens_total=0,
            spec_verify_steps_total=0,
        )
    )
    assert value(metrics, "bisllm_kv_cache_usage") == 0
    assert value(metrics, "bisllm_prefix_cache_hit_rate") == 0
    assert value(metrics, "speculation_rate") == 0
    assert value(metrics, "bisllm_spec_accept_length") == 0


def test_in_flight_tokens_answers_the_keda_query(tmp_path: Path) -> None:
    # Render the real k8s package and take the selector KEDA will send to Prometheus.
    example = ROOT / "examples" / "qwen3-30b-a3b-h100.yaml"
    validation = validate_file(example)
    assert validation.ok and validation.spec is not None, validation.report()
    files = render_package(
        validation.spec, example.read_text(encoding="utf-8"), PackageOptions(targets=("k8s",))
    )
    scaled = yaml.safe_load(files["k8s/keda-scaledobject.yaml"])
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    match = re.search(r'(\w+)\{model_name="([^"]*)"\}', query)
    assert match, query
    metric, model_name = match.groups()

    metrics = ServerMetrics(model_name)
    metrics.update_engine(STATS)
    assert families(metrics)[metric].type == "gauge"
    assert value(metrics, metric) == STATS.in_flight_tokens


# --------------------------------------------------------------------------------------------
# registries, system gauges, threads


def test_two_servers_do_not_collide() -> None:
    a, b = ServerMetrics("model-a"), ServerMetrics("model-b")
    a.request_started()
    a.update_engine(STATS)
    assert value(a, "concurrent_requests") == 1
    assert value(b, "concurrent_requests") == 0
    assert value(b, "bisllm_in_flight_tokens") == 0
    assert b"model-a" not in b.render()[0]


def test_a_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(MODEL, registry=registry)
    metrics.request_failed(500)
    labels = {"model_name": MODEL, "status": "500"}
    assert registry.get_sample_value("bisllm_http_errors_total", labels) == 1
    # A second server in the same registry would duplicate every series; refused loudly.
    with pytest.raises(ValueError, match="Duplicated"):
        ServerMetrics("other", registry=registry)


def test_system_gauges_render_without_a_gpu() -> None:
    metrics = ServerMetrics(MODEL)
    metrics.render()  # the first cpu_percent sample is a baseline
    assert value(metrics, "memory_usage") == pytest.approx(
        psutil.Process().memory_info().rss, rel=0.5
    )
    assert value(metrics, "cpu_usage") >= 0
    for name in ("gpu_usage", "gpu_memory_usage"):
        assert 0 <= value(metrics, name) <= 100


def test_system_gauges_survive_psutil_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = ServerMetrics(MODEL)

    def refuse(*args: object, **kwargs: object) -> None:
        raise psutil.AccessDenied()

    monkeypatch.setattr(psutil.Process, "memory_info", refuse)
    assert value(metrics, "memory_usage") == 0


class FakeCuda:
    """The part of torch.cuda that gpu_sample reads."""

    def __init__(
        self,
        allocated: list[int],
        total: list[int],
        utilization: list[int] | None,
        initialized: bool = True,
    ) -> None:
        self.allocated, self.total, self.util = allocated, total, utilization
        self.initialized = initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def device_count(self) -> int:
        return len(self.allocated)

    def memory_allocated(self, i: int) -> int:
        return self.allocated[i]

    def get_device_properties(self, i: int) -> SimpleNamespace:
        return SimpleNamespace(total_memory=self.total[i])

    def utilization(self, i: int) -> int:
        if self.util is None:
            raise ModuleNotFoundError("pynvml")
        return self.util[i]


def test_gpu_sample_covers_the_devices_in_use() -> None:
    # Device 1 holds nothing of ours, so neither its memory nor its utilization counts.
    cuda = FakeCuda(allocated=[30, 0, 10], total=[100, 100, 100], utilization=[50, 99, 70])
    assert gpu_sample(cuda) == (pytest.approx(60.0), pytest.approx(0.2))


def test_gpu_sample_without_nvml_keeps_memory() -> None:
    cuda = FakeCuda(allocated=[50], total=[100], utilization=None)
    assert gpu_sample(cuda) == (0.0, pytest.approx(0.5))


@pytest.mark.parametrize(
    "cuda",
    [
        FakeCuda(allocated=[50], total=[100], utilization=[80], initialized=False),
        FakeCuda(allocated=[0, 0], total=[100, 100], utilization=[80, 80]),
        FakeCuda(allocated=[50], total=[], utilization=[80]),  # the driver fails mid-read
    ],
    ids=["uninitialized", "nothing-allocated", "driver-error"],
)
def test_gpu_sample_falls_back_to_zero(cuda: FakeCuda) -> None:
    assert gpu_sample(cuda) == (0.0, 0.0)


def test_gpu_sample_on_this_machine_never_raises() -> None:
    usage, memory = gpu_sample()
    assert usage >= 0 and 0 <= memory <= 1


def test_hooks_are_thread_safe() -> None:
    metrics = ServerMetrics(MODEL)
    threads, rounds = 16, 200
    start = threading.Barrier(threads + 1)

    def client() -> None:
        start.wait()
        for _ in range(rounds):
            metrics.request_started()
            metrics.first_token(0.01)
            metrics.tokens_emitted(3, 0.03)
            metrics.request_finished(5, 3, 1, 0.1, "stop")
            metrics.request_failed(500)

    def engine_and_scraper() -> None:
        start.wait()
        for step in range(rounds):
            metrics.update_engine(replace(STATS, step=step))
            if step % 20 == 0:
                metrics.render()

    workers = [threading.Thread(target=client) for _ in range(threads)]
    workers.append(threading.Thread(target=engine_and_scraper))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    n = threads * rounds
    assert value(metrics, "concurrent_requests") == 0
    assert value(metrics, "input_tokens_total") == 5 * n
    assert value(metrics, "output_tokens_total") == 3 * n
    assert value(metrics, "bisllm_cached_tokens_total") == n
    assert value(metrics, "bisllm_time_to_first_token_seconds_count") == n
    assert value(metrics, "bisllm_inter_token_latency_seconds_count") == 3 * n
    assert value(metrics, "tps_per_request_count") == n
    assert value(metrics, "bisllm_requests_total", finish_reason="stop") == n
    assert value(metrics, "bisllm_http_errors_total", status="500") == n
