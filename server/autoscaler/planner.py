"""The planner: every tick, one reading of a pool's load goes into the policy and the decision
comes out as autoscaler_* metrics and, when an actuator is attached, as started or retired
workers.

It runs inside the router, which sees every worker's load report. Without an actuator it only
advises: on Kubernetes the KEDA ScaledObject scales the worker Deployment from the workers' own
`bisllm_in_flight_tokens` with the same window, delay and rate (templates/k8s), and these
metrics show what the policy wants next to what the cluster does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

from bisllm_server.autoscaler.metrics import AutoscalerMetrics
from bisllm_server.autoscaler.policy import Autoscaler, LoadSample, ScaleDecision
from bisllm_server.router.core import PoolLoad

if TYPE_CHECKING:
    from bisllm_server.router.service import RouterService

log = logging.getLogger("bisllm.autoscaler")

DEFAULT_POOL = "workers"  # an aggregated deployment's one pool; disaggregation adds prefill/decode


class Actuator(Protocol):
    async def apply(self, replicas: int) -> None:
        """Move toward `replicas` workers (starting or ready); called once per tick."""

    async def close(self) -> None: ...

    def report(self) -> dict[str, Any]: ...


class Planner:
    def __init__(
        self,
        autoscaler: Autoscaler,
        read_load: Callable[[], PoolLoad],
        metrics: AutoscalerMetrics | None = None,
        *,
        pool: str = DEFAULT_POOL,
        interval_s: float = 5.0,
        actuator: Actuator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"the autoscaler interval must be positive, got {interval_s}")
        self.autoscaler = autoscaler
        self.read_load = read_load
        self.metrics = metrics
        self.pool = pool
        self.interval_s = interval_s
        self.actuator = actuator
        self.clock = clock
        self._task: asyncio.Task | None = None

    def tick(self) -> ScaleDecision:
        now = self.clock()
        load = self.read_load()
        self.autoscaler.observe(
            LoadSample(now, load.in_flight_tokens, load.requests, load.ready_workers)
        )
        decision = self.autoscaler.decide(now)
        if self.metrics is not None:
            self.metrics.show(self.pool, decision)
        if decision.changed:
            log.info(
                "pool %s: %d -> %d replicas (avg in-flight tokens %.0f, desired %.2f)",
                self.pool,
                decision.previous_scale,
                decision.rounded_desired_scale,
                decision.avg_in_flight_tokens,
                decision.desired_scale,
            )
        return decision

    async def _run(self) -> None:
        while True:
            decision = self.tick()
            if self.actuator is not None:
                try:
                    await self.actuator.apply(decision.rounded_desired_scale)
                except Exception:  # one bad tick must not end autoscaling for good
                    log.exception(
                        "pool %s: scaling to %d failed", self.pool, decision.rounded_desired_scale
                    )
            await asyncio.sleep(self.interval_s)  # the control period

    def report(self) -> dict[str, Any]:
        s = self.autoscaler.settings
        last = self.autoscaler.last
        return {
            "pool": self.pool,
            "mode": "advisory" if self.actuator is None else "actuating",
            "interval_s": self.interval_s,
            "settings": asdict(s),
            "replicas": self.autoscaler.current,
            "scale_events": self.autoscaler.scale_events,
            "last_decision": None if last is None else asdict(last),
            "actuator": None if self.actuator is None else self.actuator.report(),
        }

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"autoscaler {self.pool}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.actuator is not None:
            await self.actuator.close()


def attach_planner(
    service: RouterService,
    autoscaler: Autoscaler,
    *,
    interval_s: float = 5.0,
    actuator: Actuator | None = None,
    pool: str = DEFAULT_POOL,
    members: Callable[[str], bool] | None = None,
    metrics: AutoscalerMetrics | None = None,
) -> Planner:
    """A planner over the workers `service` routes to (those `members` accepts, when given),
    its metrics on the router's /metrics, started and stopped with the router. Several pools
    share one `metrics` (the gauges can be registered once per registry)."""
    if metrics is None:
        metrics = AutoscalerMetrics(service.metrics.registry, service.options.served_model_name)
    planner = Planner(
        autoscaler,
        lambda: service.router.pool_load(members),
        metrics,
        pool=pool,
        interval_s=interval_s,
        actuator=actuator,
    )
    service.companions.append(planner)
    return planner
