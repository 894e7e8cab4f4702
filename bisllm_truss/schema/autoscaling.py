"""Token-based autoscaling: `autoscaling_settings` and `additional_autoscaling_config`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from bisllm_truss.issues import check_all
from bisllm_truss.schema.base import StrictModel

DEFAULT_TARGET_IN_FLIGHT_TOKENS = 50_000  # low end of BIS-LLM's recommended 50k-150k start
DEFAULT_MAX_SCALE_DOWN_RATE = 20.0  # percent of replicas removed per scale_down_delay (G3 default)

StrictInt = Annotated[int, Field(strict=True)]


class AutoscalingSettings(StrictModel):
    min_replica: Annotated[int, Field(strict=True)] = 1
    max_replica: Annotated[int, Field(strict=True, ge=1)] = 1
    autoscaling_window: Annotated[int, Field(strict=True, ge=10, le=3600)] = 300
    scale_down_delay: Annotated[int, Field(strict=True, ge=0, le=3600)] = 300
    target_in_flight_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    max_scale_down_rate: Annotated[float, Field(gt=0, le=100)] | None = None
    # Request-based (v1) knobs: parsed so v1 configs can be migrated, rejected under v2.
    concurrency_target: Annotated[int, Field(strict=True, ge=1)] | None = None
    target_utilization_percentage: Annotated[int, Field(strict=True, ge=1, le=100)] | None = None

    @model_validator(mode="after")
    def _replica_bounds(self) -> AutoscalingSettings:
        check_all(
            (
                self.min_replica < 1,
                ("min_replica",),
                f"min_replica must be at least 1 (BIS-LLM does not scale to zero), got {self.min_replica}",
            ),
            (
                self.max_replica < self.min_replica,
                ("max_replica",),
                f"max_replica ({self.max_replica}) must be >= min_replica ({self.min_replica})",
            ),
        )
        return self


class AutoscalingMetric(StrictModel):
    name: Literal["in_flight_tokens"]
    target: Annotated[int, Field(strict=True, ge=1)]


class AdditionalAutoscalingConfig(StrictModel):
    metrics: Annotated[list[AutoscalingMetric], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> AdditionalAutoscalingConfig:
        seen: set[str] = set()
        duplicates = []
        for i, metric in enumerate(self.metrics):
            if metric.name in seen:
                duplicates.append(i)
            seen.add(metric.name)
        check_all(
            *(
                (True, ("metrics", i, "name"), f"metric '{self.metrics[i].name}' is listed twice")
                for i in duplicates
            )
        )
        return self

    def target(self, name: str) -> int | None:
        return next((m.target for m in self.metrics if m.name == name), None)
