"""The autoscaler_* gauges, named exactly as the product spec (§5) names the Planner's.

Every series carries `model_name` and `pool`. An aggregated deployment has one pool, `workers`;
a disaggregated one scales its `prefill` and `decode` pools on their own signals, each with its
own set of series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from bisllm_server.autoscaler.policy import ScaleDecision

# (metric name, help, the ScaleDecision field it shows)
AUTOSCALER_GAUGES: tuple[tuple[str, str, str], ...] = (
    (
        "autoscaler_in_flight_tokens",
        "In-flight tokens across the pool's workers now (uncached prompt tokens to prefill plus "
        "decoding sequences), plus prompts queued at the router.",
        "in_flight_tokens",
    ),
    (
        "autoscaler_avg_in_flight_tokens",
        "In-flight tokens averaged over autoscaling_window: what decisions use.",
        "avg_in_flight_tokens",
    ),
    (
        "autoscaler_avg_num_requests",
        "Requests in flight (running, queued in the engines and at the router), averaged over "
        "autoscaling_window.",
        "avg_num_requests",
    ),
    (
        "autoscaler_avg_num_workers",
        "Healthy workers (not starting, not draining), averaged over autoscaling_window.",
        "avg_num_workers",
    ),
    (
        "autoscaler_desired_scale",
        "Average in-flight tokens / target_in_flight_tokens, before any policy.",
        "desired_scale",
    ),
    (
        "autoscaler_policy_desired_scale",
        "The desired scale after min/max, scale_down_delay and the gradual scale-down policy.",
        "policy_desired_scale",
    ),
    (
        "autoscaler_rounded_desired_scale",
        "The replica count asked for: the policy's scale, rounded.",
        "rounded_desired_scale",
    ),
)


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.model_name = model_name
        self._gauges = [
            (Gauge(name, doc, ["model_name", "pool"], registry=registry), field)
            for name, doc, field in AUTOSCALER_GAUGES
        ]

    def show(self, pool: str, decision: ScaleDecision) -> None:
        for gauge, field in self._gauges:
            gauge.labels(self.model_name, pool).set(getattr(decision, field))
