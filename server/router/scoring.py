"""The cost of sending a request to each worker, and the choice among them.

For a prompt of L tokens in blocks of B, on worker i holding its first H_i blocks:

    prefill_blocks_i = (L - B*H_i + prefill_discount * pending_prefill_tokens_i) / B
    decode_blocks_i  = (decode_discount * decode_tokens_i + L) / B
    cost_i = overlap_weight * prefill_blocks_i + decode_weight * decode_blocks_i
             + active_request_weight * active_requests_i
    (times the session-affinity multiplier on a session's pinned worker)

The first term is the prefill this request adds plus what already waits there (TTFT); the
second the KV it will sit beside while decoding (ITL, and room in the cache). The choice is a
softmax over min-max normalised costs with `router_temperature`, so near-ties spread load and
a clearly cheaper worker almost always wins; temperature 0 takes the cheapest.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from bisllm_server.router.config import RouterConfig


@dataclass
class WorkerLoad:
    """What the router knows of one worker's load: its own bookkeeping of the requests it routed
    there, floored by the worker's last report (other routers' requests, direct traffic)."""

    active_requests: int = 0
    pending_prefill_tokens: int = 0  # uncached prompt tokens of requests without a first token
    decode_tokens: int = 0  # KV tokens of requests past their first token
    reported_in_flight_tokens: int = 0  # the worker's own in_flight_tokens, from its load report
    reported_requests: int = 0  # the worker's running plus queued requests, from the same report
    max_num_tokens: int = 2048  # the worker's per-step token budget (saturation threshold base)

    @property
    def in_flight_tokens(self) -> int:
        return max(self.pending_prefill_tokens + self.decode_tokens, self.reported_in_flight_tokens)

    @property
    def requests(self) -> int:
        return max(self.active_requests, self.reported_requests)


class CostTerms(NamedTuple):  # a tuple: built for every worker on every request
    prefill_blocks: float
    decode_blocks: float
    active_requests: int
    cost: float


def cost_terms(
    config: RouterConfig,
    load: WorkerLoad,
    *,
    prompt_tokens: int,
    overlap_blocks: int,
    block_size: int,
    affinity: bool = False,
) -> CostTerms:
    uncached = max(0, prompt_tokens - overlap_blocks * block_size)
    prefill = (uncached + config.router_prefill_token_discount * load.pending_prefill_tokens) / (
        block_size
    )
    # Decode load: the router's own count, or the worker's report when that is higher (traffic
    # this router did not see); the report already includes pending prefill, so take it out.
    decode_tokens = max(
        load.decode_tokens, load.reported_in_flight_tokens - load.pending_prefill_tokens
    )
    decode = (config.router_decode_token_discount * decode_tokens + prompt_tokens) / block_size
    cost = (
        config.router_overlap_score_weight * prefill
        + config.router_decode_block_weight * decode
        + config.router_active_request_weight * load.active_requests
    )
    if affinity:
        cost *= config.router_session_affinity_score_multiplier
    return CostTerms(prefill, decode, load.active_requests, cost)


def worker_costs(
    config: RouterConfig,
    loads: Mapping[str, WorkerLoad],
    overlaps: Mapping[str, int],
    *,
    prompt_tokens: int,
    block_size: int,
    pinned: str | None = None,
) -> dict[str, float]:
    """`cost_terms(...).cost` for every worker at once, with the constants hoisted: this runs
    for every worker on every request, so it stays plain float arithmetic."""
    w_prefill = config.router_overlap_score_weight / block_size
    w_decode = config.router_decode_block_weight / block_size
    d_prefill = config.router_prefill_token_discount
    d_decode = config.router_decode_token_discount
    w_active = config.router_active_request_weight
    costs = {}
    for name, load in loads.items():
        pending = load.pending_prefill_tokens
        uncached = prompt_tokens - overlaps[name] * block_size
        decode_tokens = load.decode_tokens
        if load.reported_in_flight_tokens - pending > decode_tokens:
            decode_tokens = load.reported_in_flight_tokens - pending
        cost = (
            w_prefill * ((uncached if uncached > 0 else 0) + d_prefill * pending)
            + w_decode * (d_decode * decode_tokens + prompt_tokens)
            + w_active * load.active_requests
        )
        if name == pinned:
            cost *= config.router_session_affinity_score_multiplier
        costs[name] = cost
    return costs


def softmax_pick(costs: Mapping[str, float], temperature: float, rng: random.Random) -> str:
    """Sample a worker with p_i ~ exp(-(c_i - min) / ((max - min) * T)); T <= 0, or all costs
    equal, takes a cheapest one (ties broken at random)."""
    if not costs:
        raise ValueError("no workers to choose from")
    names = list(costs)
    low, high = min(costs.values()), max(costs.values())
    if temperature <= 0 or not math.isfinite(temperature) or high - low <= 0:
        return rng.choice([n for n in names if costs[n] == low])
    scale = (high - low) * temperature
    weights = [math.exp(-(costs[n] - low) / scale) for n in names]
    return rng.choices(names, weights=weights)[0]


def least_loaded(loads: Mapping[str, WorkerLoad], rng: random.Random) -> str:
    """The worker with the fewest in-flight tokens, then fewest requests (ties at random)."""
    keys = {n: (load.in_flight_tokens, load.active_requests) for n, load in loads.items()}
    best = min(keys.values())
    return rng.choice([n for n, k in keys.items() if k == best])


def is_saturated(config: RouterConfig, load: WorkerLoad) -> bool:
    """Past the queue threshold: more pending prefill than the threshold's share of a step."""
    threshold = config.router_queue_threshold
    if not threshold:
        return False
    return load.pending_prefill_tokens > threshold * load.max_num_tokens


def round_robin_order(names: Sequence[str], start: int) -> list[str]:
    if not names:
        return []
    start %= len(names)
    return [*names[start:], *names[:start]]
