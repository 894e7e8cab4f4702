"""The router's settings: `b10_routing_config` (same field names) plus what the router process
itself needs. Kept free of bisllm_truss so the server package stands alone; the CLI maps the
validated config onto it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

Policy = Literal["kv", "round_robin", "least_load"]
QueuePolicy = Literal["fcfs", "wspt"]


@dataclass
class RouterConfig:
    # -- b10_routing_config ------------------------------------------------------------------
    router_queue_policy: QueuePolicy = "fcfs"
    # Weight of a worker's prefill blocks (the new request's uncached blocks plus discounted
    # pending prefill) against its decode blocks; higher favours cache hits over balance.
    router_overlap_score_weight: float = 3.5
    # Softmax temperature over min-max normalised costs; 0 picks the cheapest worker.
    router_temperature: float = 0.05
    router_decode_block_weight: float = 1.0
    # Share of other requests' pending prefill that delays this one: chunked prefill runs
    # concurrent prompts in the same steps, so queued prefill does not add up one after another.
    router_prefill_token_discount: float = 0.35
    # Share of decoding requests' resident KV counted as load: some of it is freed (requests
    # finish) before the new request's decode is done.
    router_decode_token_discount: float = 0.8
    router_active_request_weight: float = 0.0
    # A session's pinned worker has its cost multiplied by this (0: always the pinned worker
    # while it is healthy; 1: affinity off).
    router_session_affinity_score_multiplier: float = 0.5
    # Queue when every worker has more pending prefill tokens than this fraction of its
    # max_num_tokens; None or 0: never queue.
    router_queue_threshold: float | None = None
    router_active_replicas: int = 1
    # -- the router process --------------------------------------------------------------------
    policy: Policy = "kv"
    # How long blocks of a request just routed count as cached on its worker before the
    # worker's own events confirm them (predict-on-route).
    predicted_ttl_s: float = 120.0
    session_ttl_s: float = 3600.0
    max_sessions: int = 100_000
    # Disaggregated serving (workers announcing role prefill / decode): a prompt whose uncached
    # part on the chosen decode worker is at most this many tokens is prefilled there, as
    # moving its KV would cost more than computing it (Dynamo's max_local_prefill_length).
    disagg_max_local_prefill_tokens: int = 512
    # Prefill locally too when every ready prefill worker already has at least this many
    # requests in flight: waiting in their queues would cost more TTFT than a local prefill.
    # 0: never for this reason.
    disagg_max_prefill_queue: int = 8

    @classmethod
    def from_mapping(cls, values: dict[str, Any], **overrides: Any) -> RouterConfig:
        """From a `b10_routing_config` mapping (unknown keys are ignored: the schema has
        already validated them) plus process overrides."""
        known = {f.name for f in fields(cls)}
        merged = {k: v for k, v in values.items() if k in known}
        merged.update(overrides)
        return cls(**merged)
