"""Prometheus series of K/V transfers between workers, on the worker's own registry.

The decode side (which pulls) counts bytes, transfer and remote-prefill time, failures by
reason and fallbacks to local prefill; the prefill side counts what it exported.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Loopback moves a small model's K/V in milliseconds; RDMA-less cross-node links and big
# models take seconds: one set of buckets covers both.
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
FAILURE_REASONS = ("connect", "timeout", "connection_lost", "status", "integrity")
FALLBACK_REASONS = ("no_pages", "transfer_failed", "refused")


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        m = ["model_name"]
        self._bytes = Counter(
            "bisllm_kv_transfer_bytes",
            "K/V bytes received from prefill workers (serialized handoffs, header included).",
            m,
            registry=registry,
        )
        self._transfers = Counter(
            "bisllm_kv_transfers", "K/V handoffs received and accepted.", m, registry=registry
        )
        self._seconds = Histogram(
            "bisllm_kv_transfer_seconds",
            "Time to receive one handoff's bytes, from the response's first byte to its last.",
            m,
            buckets=TRANSFER_BUCKETS,
            registry=registry,
        )
        self._prefill_seconds = Histogram(
            "bisllm_kv_remote_prefill_seconds",
            "From asking a prefill worker until its answer starts: its queue plus its prefill.",
            m,
            buckets=PREFILL_BUCKETS,
            registry=registry,
        )
        self._failures = Counter(
            "bisllm_kv_transfer_failures",
            "Transfers from one prefill worker that failed (the next one is tried, then local "
            "prefill), by reason.",
            ["model_name", "reason"],
            registry=registry,
        )
        self._fallbacks = Counter(
            "bisllm_kv_local_prefill_fallbacks",
            "Requests sent for remote prefill that were prefilled here instead, by reason.",
            ["model_name", "reason"],
            registry=registry,
        )
        self._exported = Counter(
            "bisllm_kv_exported_bytes",
            "K/V bytes this worker served to decode workers (prefill side).",
            m,
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            self._failures.labels(model_name, reason)
        for reason in FALLBACK_REASONS:
            self._fallbacks.labels(model_name, reason)

    def received(self, num_bytes: int, prefill_s: float, transfer_s: float) -> None:
        self._bytes.labels(self.model_name).inc(num_bytes)
        self._transfers.labels(self.model_name).inc()
        self._prefill_seconds.labels(self.model_name).observe(prefill_s)
        self._seconds.labels(self.model_name).observe(transfer_s)

    def failed(self, reason: str) -> None:
        self._failures.labels(self.model_name, reason).inc()

    def fell_back(self, reason: str) -> None:
        self._fallbacks.labels(self.model_name, reason).inc()

    def exported(self, num_bytes: int) -> None:
        self._exported.labels(self.model_name).inc(num_bytes)
