"""`llm_config`: the blocks BIS-LLM keeps in its Management API `llm_config`, set in config.yaml.

Baseten configures routing, disaggregation, speculation and scale-down half-life through
`POST /v1/llm_models` rather than config.yaml. bisllm is self-hosted, so the same keys live here,
under the same name, and can be pasted from a Management API request body unchanged.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from bisllm_truss.issues import check_all
from bisllm_truss.schema.base import StrictModel

Unit = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]


class RoutingConfig(StrictModel):
    """`b10_routing_config`: KV-aware router knobs (defaults from the BIS-LLM docs where given)."""

    router_queue_policy: Literal["fcfs", "wspt"] = "fcfs"
    router_overlap_score_weight: NonNegative = 3.5
    # Docs say 0.05, the public router code 0.01; we follow the docs (what users read).
    router_temperature: NonNegative = 0.05
    router_decode_block_weight: NonNegative = 1.0
    router_prefill_token_discount: Unit = 0.35
    router_decode_token_discount: Unit = 0.8
    router_active_request_weight: NonNegative = 0.0
    router_session_affinity_score_multiplier: Unit = 0.5
    router_queue_threshold: NonNegative | None = None
    router_active_replicas: Annotated[int, Field(strict=True, ge=1)] = 1


class DisaggConfig(StrictModel):
    """`b10_disagg_config`: the replication unit, P prefill workers to D decode workers."""

    prefill_workers_per_replica: Annotated[int, Field(strict=True, ge=1)] | None = None
    decode_workers_per_replica: Annotated[int, Field(strict=True, ge=1)] | None = None


class DecodingType(str, enum.Enum):
    EAGLE = "Eagle"
    MTP = "MTP"
    NGRAM = "NGram"


DEFAULT_DRAFT_LEN = {DecodingType.NGRAM: 4, DecodingType.EAGLE: 3, DecodingType.MTP: 3}
MAX_DRAFT_LEN = 64


class SpeculativeConfig(StrictModel):
    decoding_type: DecodingType
    max_draft_len: Annotated[int, Field(strict=True, ge=1, le=MAX_DRAFT_LEN)] | None = None
    speculative_model_dir: Annotated[str, Field(min_length=1)] | None = None
    num_nextn_predict_layers: Annotated[int, Field(strict=True, ge=1)] | None = None
    eagle3_one_model: bool | None = None

    @field_validator("decoding_type", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any) -> Any:
        if isinstance(value, str):
            for member in DecodingType:
                if member.value.lower() == value.lower():
                    return member
        return value

    @model_validator(mode="after")
    def _fields_for_type(self) -> SpeculativeConfig:
        kind = self.decoding_type
        check_all(
            (
                kind is DecodingType.EAGLE and self.speculative_model_dir is None,
                ("speculative_model_dir",),
                "speculative_model_dir is required when decoding_type is Eagle "
                "(the directory of the Eagle draft head)",
            ),
            (
                kind is DecodingType.MTP and self.num_nextn_predict_layers is None,
                ("num_nextn_predict_layers",),
                "num_nextn_predict_layers is required when decoding_type is MTP "
                "(the model's next-token-prediction layers, e.g. 1 for DeepSeek-V3)",
            ),
            (
                kind is not DecodingType.EAGLE and self.speculative_model_dir is not None,
                ("speculative_model_dir",),
                f"speculative_model_dir only applies to Eagle, not {kind.value}",
            ),
            (
                kind is not DecodingType.MTP and self.num_nextn_predict_layers is not None,
                ("num_nextn_predict_layers",),
                f"num_nextn_predict_layers only applies to MTP, not {kind.value}",
            ),
            (
                kind is not DecodingType.EAGLE and self.eagle3_one_model is not None,
                ("eagle3_one_model",),
                f"eagle3_one_model only applies to Eagle, not {kind.value}",
            ),
        )
        return self

    @property
    def draft_len(self) -> int:
        return self.max_draft_len or DEFAULT_DRAFT_LEN[self.decoding_type]


class ScaleDownConfig(StrictModel):
    """`b10_autoscaling_config`: exponential (half-life) scale-down instead of a fixed rate."""

    scale_down_half_life_seconds: Annotated[int, Field(strict=True, ge=1, le=86_400)] | None = None


class LlmConfig(StrictModel):
    b10_routing_config: RoutingConfig = Field(default_factory=RoutingConfig)
    is_disaggregated: bool = False
    b10_disagg_config: DisaggConfig | None = None
    speculative_config: SpeculativeConfig | None = None
    b10_autoscaling_config: ScaleDownConfig = Field(default_factory=ScaleDownConfig)
    # Parallel layout beyond tensor parallelism (trt_llm.runtime.tensor_parallel_size):
    enable_attention_dp: bool = False
    expert_parallel_size: Annotated[int, Field(strict=True, ge=1)] | None = None
    data_parallel_size: Annotated[int, Field(strict=True, ge=1)] = 1
    # Where the server reads the checkpoint when it comes from `weights` (skip_build_result).
    model_path: str | None = None

    @field_validator("model_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"model_path must be an absolute path in the container, got '{value}'")
        return value
