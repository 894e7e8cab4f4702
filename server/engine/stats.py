"""A per-step snapshot of engine state: what metrics, router and autoscaler read."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class EngineStats:
    step: int
    num_running: int
    num_waiting: int
    kv_pages_total: int
    kv_pages_used: int  # held by requests or the prefix cache
    kv_pages_free: int
    kv_pages_cached: int  # in the prefix cache (evictable + pinned by running requests)
    kv_pages_evictable: int
    page_size: int
    prefill_tokens: int  # tokens computed this step by requests still prefilling
    decode_tokens: int  # tokens computed this step by decoding requests
    # The autoscaling signal: uncached prompt tokens of every prefilling request plus the full
    # sequence length of every decoding request (BIS-LLM's "in-flight tokens").
    in_flight_tokens: int
    cached_tokens: int  # prefix-cache hits of requests admitted this step
    # running totals since start
    prompt_tokens_total: int
    generation_tokens_total: int
    cached_tokens_total: int
    num_retractions_total: int
    num_finished_total: int
    # Speculative decoding, since start: draft tokens proposed and verified, those accepted,
    # and verification passes (one per request per step).
    spec_draft_tokens_total: int
    spec_accepted_tokens_total: int
    spec_verify_steps_total: int
    step_seconds: float  # wall time of the last step (schedule + forward + sample)
    schedule_seconds: float  # of which: scheduling and batch preparation
    forward_seconds: float  # of which: the model forward (the rest is sampling and bookkeeping)
    # Expert parallel: the busiest rank's routed tokens over the mean rank's, worst MoE layer,
    # over the load balancer's last window (1.0: even, or no expert parallelism).
    expert_imbalance: float = 1.0

    @property
    def kv_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0

    @property
    def speculation_rate(self) -> float:
        """Share of draft tokens accepted (0 before any draft)."""
        drafted = self.spec_draft_tokens_total
        return self.spec_accepted_tokens_total / drafted if drafted else 0.0

    @property
    def accept_length(self) -> float:
        """Tokens per verification step of a speculating request (0 before any)."""
        steps = self.spec_verify_steps_total
        return (self.spec_accepted_tokens_total + steps) / steps if steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
