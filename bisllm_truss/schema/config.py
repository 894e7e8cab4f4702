"""The whole `config.yaml` a bisllm user writes."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from bisllm_truss.schema.autoscaling import AdditionalAutoscalingConfig, AutoscalingSettings
from bisllm_truss.schema.base import StrictModel
from bisllm_truss.schema.llm_config import LlmConfig
from bisllm_truss.schema.resources import Resources
from bisllm_truss.schema.trt_llm import TrtLlm
from bisllm_truss.schema.weights import WeightsSource

EnvValue = str | bool | int | float


class BisllmConfig(StrictModel):
    model_name: str | None = None
    description: str | None = None
    model_metadata: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    environment_variables: dict[str, EnvValue] = Field(default_factory=dict)
    secrets: dict[str, str | None] = Field(default_factory=dict)
    trt_llm: TrtLlm
    weights: list[WeightsSource] = Field(default_factory=list)
    autoscaling_settings: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    additional_autoscaling_config: AdditionalAutoscalingConfig | None = None
    llm_config: LlmConfig = Field(default_factory=LlmConfig)

    @field_validator("environment_variables")
    @classmethod
    def _as_strings(cls, value: dict[str, EnvValue]) -> dict[str, EnvValue]:
        # Truss turns every value into a string (booleans lower-case); do the same up front so the
        # packaged config and the container see identical values.
        return {key: str(v).lower() if isinstance(v, bool) else str(v) for key, v in value.items()}
