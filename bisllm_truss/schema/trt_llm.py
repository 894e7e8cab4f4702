"""The `trt_llm` block: inference stack v1 (Engine-Builder-LLM, kept for migration) and v2 (BIS-LLM).

Field names, ranges, defaults and error strings follow Truss's `trt_llm_config.py` and the BIS-LLM
config reference, so a config that Baseten accepts means the same thing here.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from huggingface_hub.utils import HFValidationError, validate_repo_id
from pydantic import AliasChoices, Discriminator, Field, Tag, field_validator, model_validator

from bisllm_truss.issues import RuleViolation, check_all
from bisllm_truss.schema.base import StrictModel, explicitly_set_non_default

MAX_SEQ_LEN = 1_048_576
V2_MAX_NUM_TOKENS = 131_072  # v1 allowed up to 1_048_576


class CheckpointSource(str, enum.Enum):
    HF = "HF"
    GCS = "GCS"
    S3 = "S3"
    AZURE = "AZURE"
    REMOTE_URL = "REMOTE_URL"
    BASETEN_TRAINING = "BASETEN_TRAINING"
    LOCAL = "LOCAL"


class QuantizationType(str, enum.Enum):
    NO_QUANT = "no_quant"
    FP8 = "fp8"
    FP8_KV = "fp8_kv"
    FP8_MLP_ONLY = "fp8_mlp_only"
    FP4 = "fp4"
    FP4_KV = "fp4_kv"
    FP4_MLP_ONLY = "fp4_mlp_only"
    # Legacy v1 types: they still parse, but Baseten refuses them on push and v2 never serves them.
    WEIGHTS_INT8 = "weights_int8"
    WEIGHTS_KV_INT8 = "weights_kv_int8"
    WEIGHTS_INT4 = "weights_int4"
    WEIGHTS_INT4_KV_INT8 = "weights_int4_kv_int8"
    SMOOTH_QUANT = "smooth_quant"

    @property
    def is_fp8_family(self) -> bool:
        return self.value.startswith("fp8")

    @property
    def is_fp4_family(self) -> bool:
        return self.value.startswith("fp4")

    @property
    def is_legacy(self) -> bool:
        return self in LEGACY_QUANTIZATION


LEGACY_QUANTIZATION = frozenset(
    {
        QuantizationType.WEIGHTS_INT8,
        QuantizationType.WEIGHTS_KV_INT8,
        QuantizationType.WEIGHTS_INT4,
        QuantizationType.WEIGHTS_INT4_KV_INT8,
        QuantizationType.SMOOTH_QUANT,
    }
)


# What v2 serves, in the order users read it in error messages.
V2_QUANTIZATION_NAMES = ", ".join(q.value for q in QuantizationType if not q.is_legacy)


class BaseModelKind(str, enum.Enum):
    DECODER = "decoder"
    ENCODER = "encoder"
    ENCODER_BERT = "encoder_bert"


RENAMED_TO_DECODER = ("palmyra", "qwen", "llama", "mistral", "deepseek")


class CheckpointRepository(StrictModel):
    source: CheckpointSource
    repo: Annotated[str, Field(min_length=1)]
    revision: str | None = None
    runtime_secret_name: str = "hf_access_token"

    @model_validator(mode="after")
    def _hf_repo_id(self) -> CheckpointRepository:
        if self.source is CheckpointSource.HF:
            try:
                validate_repo_id(self.repo)
            except HFValidationError as exc:
                raise RuleViolation(
                    [(("repo",), f"HuggingFace repository validation failed: {exc}")]
                ) from exc
        return self


def _calibration_value(key: str, value: int) -> int:
    if not 64 <= value <= 16384:
        raise ValueError(f"{key} must be between 64 and 16384, but got {value}")
    if value % 64:
        raise ValueError(f"{key} must be a multiple of 64, but got {value}")
    return value


class QuantizationConfig(StrictModel):
    calib_size: Annotated[int, Field(strict=True)] = 1024
    calib_dataset: str = "abisee/cnn_dailymail"
    calib_max_seq_length: Annotated[int, Field(strict=True)] = 1536

    @field_validator("calib_size", "calib_max_seq_length")
    @classmethod
    def _multiple_of_64(cls, value: int, info: Any) -> int:
        return _calibration_value(info.field_name, value)


class PluginConfiguration(StrictModel):
    paged_kv_cache: bool = True
    use_paged_context_fmha: bool = True
    use_fp8_context_fmha: bool = False

    @model_validator(mode="after")
    def _paged(self) -> PluginConfiguration:
        check_all(
            (
                self.use_paged_context_fmha and not self.paged_kv_cache,
                ("use_paged_context_fmha",),
                "use_paged_context_fmha requires paged_kv_cache: true",
            )
        )
        return self


class SpeculativeDecodingMode(str, enum.Enum):
    DRAFT_TOKENS_EXTERNAL = "DRAFT_TOKENS_EXTERNAL"
    LOOKAHEAD_DECODING = "LOOKAHEAD_DECODING"


class SpeculatorV1(StrictModel):
    """v1 `build.speculator` (lookahead). Parsed only so `bisllm migrate` can translate it."""

    speculative_decoding_mode: SpeculativeDecodingMode = (
        SpeculativeDecodingMode.DRAFT_TOKENS_EXTERNAL
    )
    num_draft_tokens: Annotated[int, Field(strict=True, ge=1, le=2048)] | None = None
    checkpoint_repository: CheckpointRepository | None = None
    runtime: dict[str, Any] | None = None
    build: dict[str, Any] | None = None
    lookahead_windows_size: Annotated[int, Field(strict=True, ge=1)] | None = None
    lookahead_ngram_size: Annotated[int, Field(strict=True, ge=1)] | None = None
    lookahead_verification_set_size: Annotated[int, Field(strict=True, ge=1)] | None = None
    enable_b10_lookahead: bool = False

    @model_validator(mode="after")
    def _mode(self) -> SpeculatorV1:
        lookahead = self.speculative_decoding_mode is SpeculativeDecodingMode.LOOKAHEAD_DECODING
        missing = [
            name
            for name in (
                "lookahead_windows_size",
                "lookahead_ngram_size",
                "lookahead_verification_set_size",
            )
            if getattr(self, name) is None
        ]
        check_all(
            (
                not lookahead,
                ("speculative_decoding_mode",),
                "DRAFT_TOKENS_EXTERNAL speculation is discontinued; expected LOOKAHEAD_DECODING",
            ),
            *(
                (lookahead, (name,), f"{name} is required for LOOKAHEAD_DECODING")
                for name in missing
            ),
        )
        return self


class LoraConfiguration(StrictModel):
    max_lora_rank: Annotated[int, Field(strict=True, ge=1)] = 64
    lora_target_modules: list[str] = Field(default_factory=list)


class BuildV1(StrictModel):
    """`trt_llm.build` as Truss defines it for every stack (v2 restricts it, see BuildV2)."""

    base_model: BaseModelKind = BaseModelKind.DECODER
    max_seq_len: Annotated[int, Field(strict=True, ge=1, le=MAX_SEQ_LEN)] | None = None
    max_batch_size: Annotated[int, Field(strict=True, ge=1, le=2048)] = 256
    max_num_tokens: Annotated[int, Field(strict=True, gt=64, le=1_048_576)] = 8192
    max_beam_width: Annotated[int, Field(strict=True, ge=1, le=1)] = 1
    max_prompt_embedding_table_size: Annotated[int, Field(strict=True, ge=0)] = 0
    checkpoint_repository: CheckpointRepository | None = None
    gather_all_token_logits: bool = False
    strongly_typed: bool = False
    quantization_type: QuantizationType = QuantizationType.NO_QUANT
    quantization_config: QuantizationConfig = Field(default_factory=QuantizationConfig)
    tensor_parallel_count: Annotated[int, Field(strict=True, ge=1)] = 1
    pipeline_parallel_count: Annotated[int, Field(strict=True, ge=1)] = 1
    moe_expert_parallel_option: Annotated[int, Field(strict=True)] = -1
    sequence_parallel_count: Annotated[int, Field(strict=True, ge=1)] = 1
    plugin_configuration: PluginConfiguration = Field(default_factory=PluginConfiguration)
    num_builder_gpus: Annotated[int, Field(strict=True, ge=1)] | None = None
    speculator: SpeculatorV1 | None = None
    lora_adapters: dict[str, CheckpointRepository] | None = None
    lora_configuration: LoraConfiguration | None = None
    skip_build_result: bool = False

    @field_validator("base_model", mode="before")
    @classmethod
    def _legacy_base_model(cls, value: Any) -> Any:
        if value in RENAMED_TO_DECODER:
            raise ValueError(
                f"base_model `{value}` was renamed to `decoder`; use base_model: decoder"
            )
        if value == "whisper":
            raise ValueError(
                "base_model `whisper` is not served by trt_llm any more (moved to Chains)"
            )
        return value


V2_ALLOWED_BUILD_FIELDS = frozenset(
    {
        "checkpoint_repository",
        "quantization_type",
        "quantization_config",
        "num_builder_gpus",
        "skip_build_result",
    }
)

# Where a rejected v1 build field lives under v2, so the error can say what to do instead.
V2_BUILD_FIELD_ADVICE = {
    "base_model": "Delete it: the architecture is read from the checkpoint.",
    "max_seq_len": "Move it to trt_llm.runtime.max_seq_len.",
    "max_batch_size": "Move it to trt_llm.runtime.max_batch_size.",
    "max_num_tokens": "Move it to trt_llm.runtime.max_num_tokens.",
    "tensor_parallel_count": "Rename it to trt_llm.runtime.tensor_parallel_size.",
    "plugin_configuration": "Delete it: paged KV and paged context attention are always on.",
    "speculator": "Delete it and use llm_config.speculative_config (Eagle, MTP or NGram).",
}


class BuildV2(BuildV1):
    """`trt_llm.build` under inference_stack v2: only five fields may differ from their defaults."""

    @model_validator(mode="after")
    def _only_v2_fields(self) -> BuildV2:
        violations = []
        for name in type(self).model_fields:
            if name in V2_ALLOWED_BUILD_FIELDS or not explicitly_set_non_default(self, name):
                continue
            message = (
                f"Field trt_llm.build.{name} is not allowed to be set when using v2 inference stack"
            )
            advice = V2_BUILD_FIELD_ADVICE.get(name, "Delete it (bisllm migrate does this).")
            violations.append(((name,), f"{message}. {advice}"))
        if self.checkpoint_repository is None and not self.skip_build_result:
            violations.append(
                (
                    ("checkpoint_repository",),
                    "trt_llm.build.checkpoint_repository is required when "
                    "trt_llm.build.skip_build_result is not set for v2 inference stack.",
                )
            )
        if self.quantization_type.is_legacy:
            violations.append(
                (
                    ("quantization_type",),
                    f"quantization_type {self.quantization_type.value} is not supported by the v2 "
                    f"inference stack; expected one of: {V2_QUANTIZATION_NAMES}",
                )
            )
        if violations:
            raise RuleViolation(violations)
        return self


class BatchSchedulerPolicy(str, enum.Enum):
    MAX_UTILIZATION = "max_utilization"
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"


class RuntimeV1(StrictModel):
    kv_cache_free_gpu_mem_fraction: Annotated[float, Field(ge=0, le=1)] = 0.9
    kv_cache_host_memory_bytes: Annotated[int, Field(strict=True, ge=1)] | None = None
    enable_chunked_context: bool = True
    batch_scheduler_policy: BatchSchedulerPolicy = BatchSchedulerPolicy.GUARANTEED_NO_EVICT
    request_default_max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    served_model_name: str | None = None
    total_token_limit: Annotated[int, Field(strict=True, ge=1)] = 500_000
    webserver_default_route: (
        Literal["/v1/embeddings", "/rerank", "/predict", "/predict_tokens", "/v1/systemone"] | None
    ) = None
    lora_cache_max_adapter_size: Annotated[int, Field(strict=True, ge=1)] | None = None
    lora_cache_optimal_adapter_size: Annotated[int, Field(strict=True, ge=1)] | None = None
    lora_cache_gpu_memory_fraction: Annotated[float, Field(ge=0, le=1)] | None = None
    lora_cache_host_memory_bytes: Annotated[int, Field(strict=True, ge=1)] | None = None


PatchValue = str | int | float | bool | dict[str, Any] | list[Any] | None


class RuntimeV2(StrictModel):
    max_seq_len: Annotated[int, Field(strict=True, ge=1, le=MAX_SEQ_LEN)] | None = None
    max_batch_size: Annotated[int, Field(strict=True, ge=1, le=2048)] = 256
    max_num_tokens: Annotated[int, Field(strict=True, gt=64, le=V2_MAX_NUM_TOKENS)] = 8192
    tensor_parallel_size: Annotated[int, Field(strict=True, ge=1)] = 1
    enable_chunked_prefill: bool = True
    served_model_name: Annotated[str, Field(min_length=1)] | None = None
    patch_kwargs: dict[str, PatchValue] = Field(
        default_factory=dict, validation_alias=AliasChoices("patch_kwargs", "gated_features")
    )

    @model_validator(mode="after")
    def _patch_keys(self) -> RuntimeV2:
        reserved = (set(type(self).model_fields) - {"patch_kwargs"}) | {"build_config"}
        check_all(
            *(
                (
                    key in reserved,
                    ("patch_kwargs", key),
                    f"patch_kwargs must not repeat a runtime field or build_config; "
                    f"set trt_llm.runtime.{key} directly"
                    if key != "build_config"
                    else "patch_kwargs must not contain build_config",
                )
                for key in self.patch_kwargs
            )
        )
        return self


class VersionOverrides(StrictModel):
    engine_builder_version: str | None = None
    briton_version: str | None = None
    bei_version: str | None = None
    bei_bert_version: str | None = None
    # Pins the serving image; bisllm uses it as the tag of its runtime image.
    v2_llm_version: str | None = None

    @field_validator("engine_builder_version", "briton_version", "bei_version", "bei_bert_version")
    @classmethod
    def _starts_with_digit(cls, value: str | None, info: Any) -> str | None:
        if value is not None and not value[:1].isdigit():
            raise ValueError(f"{info.field_name} must start with a number")
        return value


class TrtLlmV1(StrictModel):
    inference_stack: Literal["v1"] = "v1"
    build: BuildV1
    runtime: RuntimeV1 = Field(default_factory=RuntimeV1)
    version_overrides: VersionOverrides = Field(default_factory=VersionOverrides)

    @model_validator(mode="after")
    def _v1_checkpoint(self) -> TrtLlmV1:
        check_all(
            (
                self.build.checkpoint_repository is None,
                ("build", "checkpoint_repository"),
                "trt_llm.build.checkpoint_repository is required for v1 inference stack.",
            ),
        )
        return self


class TrtLlmV2(StrictModel):
    inference_stack: Literal["v2"]
    build: BuildV2
    runtime: RuntimeV2
    version_overrides: VersionOverrides = Field(default_factory=VersionOverrides)


def _stack_of(value: Any) -> str | None:
    """Absent `inference_stack` means v1, exactly as Truss reads it."""
    if isinstance(value, dict):
        return value.get("inference_stack", "v1")
    return getattr(value, "inference_stack", None)


TrtLlm = Annotated[
    Annotated[TrtLlmV1, Tag("v1")] | Annotated[TrtLlmV2, Tag("v2")],
    Discriminator(
        _stack_of,
        custom_error_type="invalid_inference_stack",
        custom_error_message="inference_stack must be one of: v1, v2",
    ),
]
