"""Prometheus metrics for one serving process, rendered at `/metrics`.

The product spec (§5) names the seed metrics a deployment shows; they keep those names exactly.
Everything else is ours and starts with `bisllm_`. Every series carries `model_name`, because the
KEDA ScaledObject in templates/k8s queries `bisllm_in_flight_tokens{model_name="…"}` and the
other series are read the same way.

Counters follow Prometheus convention: the family is named as the spec says (`input_tokens`) and
its sample gets the `_total` suffix (`input_tokens_total`), so `rate(input_tokens_total[1m])` is
the throughput the spec means. Exposing the bare name would need a gauge that only ever grows,
which breaks `rate()` across restarts, so we don't.

The hooks only touch prometheus_client values, each guarded by its own lock, so they are cheap and
safe to call from any thread (HTTP handlers, the engine loop). System gauges are sampled when
Prometheus scrapes, not on a timer, so an idle server does no metrics work.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bisllm_server.engine.stats import EngineStats

# Latencies on CPU run to tens of seconds and on a GPU to milliseconds; one set of buckets
# covers both so dashboards don't depend on the hardware.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)

# Pre-created so their series exist at 0 before the first request, which keeps rate() and
# dashboard panels defined on a fresh replica.
KNOWN_STATUSES = ("starting", "active")
KNOWN_FINISH_REASONS = ("stop", "length")


class ServerMetrics:
    """All metrics of one serving process, in a registry of its own unless one is given."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        # An own registry by default: tests and several servers in one process would otherwise
        # collide in prometheus_client's global one.
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        m = ("model_name",)

        # -- the spec's seed metrics (§5) -----------------------------------------------------
        self._tps = Histogram(
            "tps_per_request",
            "Output tokens per second of each finished request (output tokens / end-to-end time).",
            m,
            buckets=TPS_BUCKETS,
            registry=r,
        ).labels(model_name)
        self._input_tokens = Counter(
            "input_tokens", "Prompt tokens of finished requests.", m, registry=r
        ).labels(model_name)
        self._output_tokens = Counter(
            "output_tokens", "Generated tokens of finished requests.", m, registry=r
        ).labels(model_name)
        self._input_per_request = Histogram(
            "input_tokens_per_request",
            "Prompt tokens per finished request.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        ).labels(model_name)
        self._output_per_request = Histogram(
            "output_tokens_per_request",
            "Generated tokens per finished request.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        ).labels(model_name)
        self._concurrent = Gauge(
            "concurrent_requests", "Requests in flight in the HTTP server.", m, registry=r
        ).labels(model_name)
        self._speculation_rate = Gauge(
            "speculation_rate",
            "Share of draft tokens accepted (0..1); 0 while speculative decoding is off.",
            m,
            registry=r,
        ).labels(model_name)
        self._speculation_rate.set(0)
        self._accept_length = Gauge(
            "bisllm_spec_accept_length",
            "Mean tokens a speculating request gets per verification step (accepted drafts + 1), "
            "since start; 0 while speculative decoding is off.",
            m,
            registry=r,
        ).labels(model_name)
        self._replicas = Gauge(
            "replica_count_by_status",
            "This replica, counted under its lifecycle status (1) and 0 under the others.",
            (*m, "status"),
            registry=r,
        )
        # cpu_usage, memory_usage, gpu_usage and gpu_memory_usage are sampled at scrape time.
        r.register(_SystemCollector(model_name))
        r.register(_HydrateCollector(model_name))

        # -- ours ------------------------------------------------------------------------------
        self._ttft = Histogram(
            "bisllm_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(model_name)
        self._itl = Histogram(
            "bisllm_inter_token_latency_seconds",
            "Time between generated tokens after the first, one observation per token.",
            m,
            buckets=ITL_BUCKETS,
            registry=r,
        ).labels(model_name)
        self._e2e = Histogram(
            "bisllm_e2e_request_latency_seconds",
            "Time from request arrival to its last byte, whatever the outcome.",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        ).labels(model_name)
        self._waiting = Gauge(
            "bisllm_num_requests_waiting", "Requests queued in the engine.", m, registry=r
        ).labels(model_name)
        self._running = Gauge(
            "bisllm_num_requests_running", "Requests in the engine's running batch.", m, registry=r
        ).labels(model_name)
        self._kv_usage = Gauge(
            "bisllm_kv_cache_usage",
            "Share of KV cache pages held by requests (0..1); evictable prefix-cache pages count as free.",
            m,
            registry=r,
        ).labels(model_name)
        self._expert_imbalance = Gauge(
            "bisllm_expert_load_imbalance",
            "Expert parallel: routed tokens on the busiest rank / the mean rank, worst MoE "
            "layer, over the load balancer's last window (1: even, or no expert parallelism).",
            m,
            registry=r,
        ).labels(model_name)
        self._prefix_hit_rate = Gauge(
            "bisllm_prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens, since the engine started.",
            m,
            registry=r,
        ).labels(model_name)
        self._in_flight = Gauge(
            "bisllm_in_flight_tokens",
            "Uncached prompt tokens of prefilling requests plus the sequence length of decoding requests (the autoscaling signal).",
            m,
            registry=r,
        ).labels(model_name)
        self._cached_tokens = Counter(
            "bisllm_cached_tokens",
            "Prompt tokens of finished requests that were served from the prefix cache.",
            m,
            registry=r,
        ).labels(model_name)
        self._requests = Counter(
            "bisllm_requests",
            "Finished requests by finish reason.",
            (*m, "finish_reason"),
            registry=r,
        )
        self._http_errors = Counter(
            "bisllm_http_errors",
            "Error responses by HTTP status code.",
            (*m, "status"),
            registry=r,
        )
        for reason in KNOWN_FINISH_REASONS:
            self._requests.labels(model_name, reason)

        # set_status compares against every status seen so far; the lock keeps two concurrent
        # calls from leaving two statuses at 1.
        self._status_lock = threading.Lock()
        self._statuses: set[str] = set(KNOWN_STATUSES)
        self.set_status("starting")

    # -- hooks for the HTTP layer -------------------------------------------------------------

    def request_started(self) -> None:
        """A request was accepted. Pair every call with exactly one `request_finished`."""
        self._concurrent.inc()

    def first_token(self, ttft_s: float) -> None:
        """The request's first token reached the client `ttft_s` seconds after arrival."""
        self._ttft.observe(ttft_s)

    def tokens_emitted(self, n: int, gap_s: float) -> None:
        """A chunk of `n` tokens came `gap_s` seconds after the previous one.

        Each token counts as one observation of `gap_s / n`, so a chunk of several tokens (a
        detokenizer hold-back, later speculative decoding) weighs as much as the tokens in it.
        """
        if n <= 0:
            return
        per_token = gap_s / n
        for _ in range(n):
            self._itl.observe(per_token)

    def request_finished(
        self,
        prompt_tokens: int,
        output_tokens: int,
        cached_tokens: int,
        duration_s: float,
        finish_reason: str,
    ) -> None:
        """A started request ended, however it ended (stop, length, abort, error).

        Token counters move here, once per request, so they always equal the usage the clients
        were billed; a long generation therefore shows up in `rate()` when it finishes.
        """
        self._concurrent.dec()
        self._requests.labels(self.model_name, finish_reason).inc()
        self._input_tokens.inc(prompt_tokens)
        self._output_tokens.inc(output_tokens)
        self._cached_tokens.inc(cached_tokens)
        self._input_per_request.observe(prompt_tokens)
        self._output_per_request.observe(output_tokens)
        self._e2e.observe(duration_s)
        # A request that produced nothing has no speed; counting it as 0 tok/s would drag the
        # distribution down with failures that other series already show.
        if output_tokens > 0 and duration_s > 0:
            self._tps.observe(output_tokens / duration_s)

    def request_failed(self, status: int) -> None:
        """An error response with HTTP `status` was sent, before or after `request_started`.

        This only counts the response: a request that had started still needs its
        `request_finished` (with finish_reason "error") to leave `concurrent_requests`.
        """
        self._http_errors.labels(self.model_name, str(status)).inc()

    # -- engine and lifecycle -----------------------------------------------------------------

    def update_engine(self, stats: EngineStats) -> None:
        """Set the engine gauges from the latest per-step snapshot."""
        self._waiting.set(stats.num_waiting)
        self._running.set(stats.num_running)
        self._in_flight.set(stats.in_flight_tokens)
        self._speculation_rate.set(stats.speculation_rate)
        self._accept_length.set(stats.accept_length)
        # Pages held only by the prefix cache can be evicted on demand, so they are not pressure;
        # counting them would show a warm server as permanently full.
        held = stats.kv_pages_used - stats.kv_pages_evictable
        self._kv_usage.set(held / stats.kv_pages_total if stats.kv_pages_total else 0.0)
        self._expert_imbalance.set(stats.expert_imbalance)
        if stats.prompt_tokens_total > 0:
            rate = stats.cached_tokens_total / stats.prompt_tokens_total
            self._prefix_hit_rate.set(min(rate, 1.0))
        else:
            self._prefix_hit_rate.set(0.0)

    def set_status(self, status: str) -> None:
        """Count this replica under `status` ("starting" while loading, "active" when healthy)."""
        with self._status_lock:
            self._statuses.add(status)
            for known in self._statuses:
                self._replicas.labels(self.model_name, known).set(1 if known == status else 0)

    def render(self) -> tuple[bytes, str]:
        """The `/metrics` response: body and content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SystemCollector:
    """cpu_usage, memory_usage, gpu_usage and gpu_memory_usage of this process, read per scrape."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name
        self._process = psutil.Process()
        # psutil's non-blocking cpu_percent measures since its previous call on this object, so
        # concurrent scrapes must not interleave on it.
        self._lock = threading.Lock()
        self._process.cpu_percent(interval=None)  # the first call only sets the baseline

    def describe(self) -> Iterable[Metric]:
        # Lets the registry check names without sampling anything at registration.
        return self._families(0.0, 0.0, 0.0, 0.0, with_samples=False)

    def collect(self) -> Iterable[Metric]:
        cpu, rss = self._process_sample()
        gpu, gpu_memory = gpu_sample()
        return self._families(cpu, rss, gpu, gpu_memory, with_samples=True)

    def _process_sample(self) -> tuple[float, float]:
        with self._lock:
            try:
                cpu = self._process.cpu_percent(interval=None)
                rss = self._process.memory_info().rss
            except psutil.Error:
                # A scrape must not fail because the OS refused a read.
                return 0.0, 0.0
        return cpu, float(rss)

    def _families(
        self, cpu: float, rss: float, gpu: float, gpu_memory: float, *, with_samples: bool
    ) -> Iterator[Metric]:
        specs = (
            ("cpu_usage", "CPU used by this process, in percent of one core.", cpu),
            ("memory_usage", "Resident memory of this process, in bytes.", rss),
            ("gpu_usage", "Mean utilization of the GPUs this process uses, in percent.", gpu),
            (
                "gpu_memory_usage",
                "Memory allocated by this process / total memory of the GPUs it uses (0..1).",
                gpu_memory,
            ),
        )
        for name, doc, value in specs:
            family = GaugeMetricFamily(name, doc, labels=("model_name",))
            if with_samples:
                family.add_metric((self._model_name,), value)
            yield family


# bisllm_bdn.hydrate.STATS counter -> (metric name, help).
HYDRATE_COUNTERS = {
    "hydrations": ("bisllm_hydrations", "Manifests hydrated by this process."),
    "files": ("bisllm_hydrate_files", "Files placed in mounts by hydration."),
    "bytes_fetched": ("bisllm_hydrate_bytes_fetched", "Bytes fetched from the origin store."),
    "bytes_resumed": (
        "bisllm_hydrate_bytes_resumed",
        "Bytes of interrupted fetches reused instead of fetched again.",
    ),
    "blobs_fetched": ("bisllm_hydrate_blobs_fetched", "Blobs fetched from the origin store."),
    "cache_hits": ("bisllm_hydrate_cache_hits", "Files served from the node cache."),
    "corrupt_blobs": ("bisllm_hydrate_corrupt_blobs", "Blobs that failed sha256 verification."),
}


class _HydrateCollector:
    """The weights hydration this process ran before serving (bisllm serve hydrates its
    manifests first), from bisllm_bdn's process-wide counters."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name

    def describe(self) -> Iterable[Metric]:
        return self._families({}, with_samples=False)

    def collect(self) -> Iterable[Metric]:
        # Only a process that hydrated has imported the hydrator; others report zeros rather
        # than import boto3 for a scrape.
        module = sys.modules.get("bisllm_bdn.hydrate")
        stats = module.STATS.snapshot() if module is not None else {}
        return self._families(stats, with_samples=True)

    def _families(self, stats: dict[str, int], *, with_samples: bool) -> Iterator[Metric]:
        for key, (name, doc) in HYDRATE_COUNTERS.items():
            family = CounterMetricFamily(name, doc, labels=("model_name",))
            if with_samples:
                family.add_metric((self._model_name,), float(stats.get(key, 0)))
            yield family


def gpu_sample(cuda: Any | None = None) -> tuple[float, float]:
    """(utilization in percent, allocated / total memory) over the GPUs this process uses.

    `cuda` is torch.cuda unless a test passes a stand-in. Zeros when torch was never imported,
    CUDA was never initialized in this process, or the driver won't answer: metrics must not
    create a CUDA context (hundreds of MB per device) nor fail a scrape.
    """
    if cuda is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return 0.0, 0.0
        cuda = torch.cuda
    try:
        if not cuda.is_initialized():
            return 0.0, 0.0
        count = cuda.device_count()
        devices = [i for i in range(count) if cuda.memory_allocated(i) > 0]
        if not devices:
            return 0.0, 0.0
        allocated = sum(cuda.memory_allocated(i) for i in devices)
        total = sum(cuda.get_device_properties(i).total_memory for i in devices)
        memory = allocated / total if total else 0.0
    except Exception:
        # Broad on purpose: driver and allocator errors vary by torch version and platform.
        return 0.0, 0.0
    return _utilization(cuda, devices), memory


def _utilization(cuda: Any, devices: list[int]) -> float:
    """Mean NVML utilization over `devices`; 0 where NVML (pynvml) is missing or fails."""
    total = 0.0
    for i in devices:
        try:
            total += float(cuda.utilization(i))
        except Exception:
            # torch.cuda.utilization needs pynvml, which a slim image may lack.
            return 0.0
    return total / len(devices)
