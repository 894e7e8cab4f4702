"""The router's Prometheus metrics: the `kv_cache_*` gauges BIS-LLM documents, decision latency,
and each worker's load as the router sees it.

Hit rates are ratios of token sums over a sliding window (default 5 minutes):
- `kv_cache_hit_rate`: cached / prompt tokens as the workers report them (what really hit);
- `kv_cache_best_prefix_hit_rate`: the best prefix any worker held at routing time (the bound);
- `kv_cache_hit_rate_skew`: the router's estimate for its chosen workers minus the actual;
- `kv_cache_hit_rate_efficiency`: actual / best (below 1: hits traded for balance).
The underlying token counters are exported too, so Prometheus can take its own rates.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bisllm_server.router.core import Decision, PairDecision, Router


class _Window:
    """Sums of a few numbers over the last `seconds`."""

    def __init__(self, seconds: float, width: int, clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self.clock = clock
        self._items: deque[tuple[float, tuple[float, ...]]] = deque()
        self._sums = [0.0] * width

    def add(self, *values: float) -> None:
        self._items.append((self.clock(), values))
        for i, v in enumerate(values):
            self._sums[i] += v

    def sums(self) -> list[float]:
        horizon = self.clock() - self.seconds
        while self._items and self._items[0][0] < horizon:
            _, values = self._items.popleft()
            for i, v in enumerate(values):
                self._sums[i] -= v
        return list(self._sums)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


class RouterMetrics:
    def __init__(
        self,
        router: Router,
        model_name: str,
        *,
        window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._routed = _Window(window_s, 3, clock)  # prompt, estimated cached, best cached
        self._actual = _Window(window_s, 2, clock)  # workers' prompt, cached
        self.totals = {
            "requests": 0,
            "prompt_tokens": 0,
            "estimated_cached_tokens": 0,
            "best_cached_tokens": 0,
            "worker_prompt_tokens": 0,
            "worker_cached_tokens": 0,
            "retries": 0,
        }
        labels = ["model"]
        self._decision = Histogram(
            "bisllm_router_decision_seconds",
            "Time to score the workers and pick one for a request.",
            labels,
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
            registry=self.registry,
        )
        self._requests = Counter(
            "bisllm_router_requests",
            "Requests sent to a worker, by worker and why it was chosen.",
            [*labels, "worker", "reason"],
            registry=self.registry,
        )
        self._retries = Counter(
            "bisllm_router_retries",
            "Requests sent again to another worker after theirs failed before the first token.",
            labels,
            registry=self.registry,
        )
        self._disagg = Counter(
            "bisllm_router_disagg_decisions",
            "Disaggregated requests by where their prompt was prefilled (mode: remote on a "
            "prefill worker, local on the decode worker) and why.",
            [*labels, "mode", "reason"],
            registry=self.registry,
        )
        self._failures = Counter(
            "bisllm_router_failed_requests",
            "Requests the router answered with an error, by reason.",
            [*labels, "reason"],
            registry=self.registry,
        )
        self._tokens = {
            name: Counter(f"bisllm_router_{name}", help_text, labels, registry=self.registry)
            for name, help_text in (
                ("prompt_tokens", "Prompt tokens routed."),
                (
                    "estimated_cached_tokens",
                    "Prompt tokens the router expected its choice to hold.",
                ),
                ("best_cached_tokens", "Prompt tokens the best-placed worker held."),
                ("worker_prompt_tokens", "Prompt tokens the workers report processing."),
                ("worker_cached_tokens", "Prompt tokens the workers report serving from cache."),
            )
        }
        self.registry.register(_StateCollector(self))

    # -- events ----------------------------------------------------------------------------------

    def decided(self, decision: Decision) -> None:
        self._decision.labels(self.model_name).observe(decision.decision_seconds)
        self._requests.labels(self.model_name, decision.worker, decision.reason).inc()
        estimated, best = decision.estimated_cached_tokens, decision.best_cached_tokens
        self._routed.add(decision.prompt_tokens, estimated, best)
        for name, value in (
            ("prompt_tokens", decision.prompt_tokens),
            ("estimated_cached_tokens", estimated),
            ("best_cached_tokens", best),
        ):
            self._tokens[name].labels(self.model_name).inc(value)
            self.totals[name] += value
        self.totals["requests"] += 1

    def disaggregated(self, pair: PairDecision) -> None:
        self._disagg.labels(self.model_name, pair.mode, pair.reason).inc()

    def worker_report(self, address: str, previous: dict[str, Any], report: dict[str, Any]) -> None:
        """A worker's cumulative counters moved on; count the difference (a restarted worker,
        whose previous report was reset, counts from zero)."""
        prompt = int(report.get("prompt_tokens_total", 0)) - int(
            previous.get("prompt_tokens_total", 0)
        )
        cached = int(report.get("cached_tokens_total", 0)) - int(
            previous.get("cached_tokens_total", 0)
        )
        if prompt <= 0 and cached <= 0:
            return
        prompt, cached = max(prompt, 0), max(cached, 0)
        self._actual.add(prompt, cached)
        self._tokens["worker_prompt_tokens"].labels(self.model_name).inc(prompt)
        self._tokens["worker_cached_tokens"].labels(self.model_name).inc(cached)
        self.totals["worker_prompt_tokens"] += prompt
        self.totals["worker_cached_tokens"] += cached

    def retried(self) -> None:
        self._retries.labels(self.model_name).inc()
        self.totals["retries"] += 1

    def failed(self, reason: str) -> None:
        self._failures.labels(self.model_name, reason).inc()

    # -- views -------------------------------------------------------------------------------------

    def rates(self) -> dict[str, float]:
        prompt, estimated, best = self._routed.sums()
        worker_prompt, worker_cached = self._actual.sums()
        actual = _ratio(worker_cached, worker_prompt)
        best_rate = _ratio(best, prompt)
        estimated_rate = _ratio(estimated, prompt)
        return {
            "kv_cache_hit_rate": actual,
            "kv_cache_best_prefix_hit_rate": best_rate,
            "kv_cache_estimated_hit_rate": estimated_rate,
            "kv_cache_hit_rate_skew": estimated_rate - actual,
            "kv_cache_hit_rate_efficiency": _ratio(actual, best_rate),
        }

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    """Read at scrape time from the router's own state, so no gauge goes stale."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        model = self.metrics.model_name
        router = self.metrics.router
        for name, value in self.metrics.rates().items():
            family = GaugeMetricFamily(name, _RATE_HELP[name], labels=["model"])
            family.add_metric([model], value)
            yield family
        queue = GaugeMetricFamily(
            "bisllm_router_queue_depth", "Requests waiting for a worker.", labels=["model"]
        )
        queue.add_metric([model], router.queue_depth)
        yield queue
        per_worker = {
            "active_requests": "Requests the router has in flight on the worker.",
            "pending_prefill_tokens": "Uncached prompt tokens routed there without a first token.",
            "decode_tokens": "KV tokens of the worker's decoding requests (router's count).",
            "reported_in_flight_tokens": "The worker's own in-flight token count (last report).",
        }
        families = {
            key: GaugeMetricFamily(f"bisllm_router_worker_{key}", text, labels=["model", "worker"])
            for key, text in per_worker.items()
        }
        up = GaugeMetricFamily(
            "bisllm_router_worker_up",
            "1 when the worker takes new requests (ready), 0 when down or draining.",
            labels=["model", "worker", "status"],
        )
        blocks = GaugeMetricFamily(
            "bisllm_router_worker_index_blocks",
            "KV blocks the router's index holds for the worker.",
            labels=["model", "worker"],
        )
        for name, info in router.workers.items():
            for key, family in families.items():
                family.add_metric([model, name], getattr(info.load, key))
            up.add_metric([model, name, info.status], 1 if info.status == "ready" else 0)
            blocks.add_metric([model, name], router.index.num_blocks(name))
        yield from families.values()
        yield up
        yield blocks


_RATE_HELP = {
    "kv_cache_hit_rate": "Share of prompt tokens the workers served from cache (5 min window).",
    "kv_cache_best_prefix_hit_rate": "Share of prompt tokens the best-placed worker held.",
    "kv_cache_estimated_hit_rate": "Share of prompt tokens the router expected its choices to hold.",
    "kv_cache_hit_rate_skew": "Router-estimated hit rate minus the actual one.",
    "kv_cache_hit_rate_efficiency": "Actual hit rate over the best possible one.",
}
