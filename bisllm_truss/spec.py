"""The normalized deployment spec: every default filled in, every later component reads only this.

Data flows one way: config.yaml → BisllmConfig (validated) → DeploymentSpec → runtime arguments,
templates and manifests. The spec is serialized as canonical JSON so it can travel in a ConfigMap
or an image and be hashed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from bisllm_truss import __version__
from bisllm_truss.hardware import GPU_INFO
from bisllm_truss.rules import CHECKPOINT_MOUNT
from bisllm_truss.schema import BisllmConfig
from bisllm_truss.schema.autoscaling import (
    DEFAULT_MAX_SCALE_DOWN_RATE,
    DEFAULT_TARGET_IN_FLIGHT_TOKENS,
)
from bisllm_truss.schema.llm_config import RoutingConfig
from bisllm_truss.schema.trt_llm import CheckpointRepository, CheckpointSource, TrtLlmV2

SPEC_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WeightsMount(_Frozen):
    source: str
    mount_location: str
    secret_name: str | None = None
    auth: dict[str, Any] | None = None
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None


class CheckpointSpec(_Frozen):
    source_kind: str  # HF, S3, GCS, AZURE, REMOTE_URL, BASETEN_TRAINING, LOCAL, or WEIGHTS
    source_uri: str | None
    revision: str | None
    model_path: str  # where the server reads config.json / safetensors / tokenizer
    quantization: str
    calibration: dict[str, Any] | None  # only when the engine quantizes at load


class HardwareSpec(_Frozen):
    accelerator: str | None  # e.g. "B200"
    gpus_per_node: int
    node_count: int
    total_gpus: int
    compute_capability: int | None
    gpu_memory_gib: int | None
    cpu: str
    memory: str


class EngineSpec(_Frozen):
    max_seq_len: int | None  # None: the checkpoint's max_position_embeddings
    max_batch_size: int
    max_num_tokens: int
    enable_chunked_prefill: bool
    patch_kwargs: dict[str, Any]


class ParallelSpec(_Frozen):
    tensor_parallel_size: int
    data_parallel_size: int  # full engine replicas inside one deployment replica
    expert_parallel_size: int
    enable_attention_dp: bool
    attention_dp_size: int  # tensor_parallel_size when enable_attention_dp, else 1
    world_size: int


class DisaggregationSpec(_Frozen):
    enabled: bool
    prefill_workers_per_replica: int
    decode_workers_per_replica: int


class SpeculationSpec(_Frozen):
    decoding_type: Literal["Eagle", "MTP", "NGram"]
    max_draft_len: int
    speculative_model_dir: str | None
    num_nextn_predict_layers: int | None
    eagle3_one_model: bool


class AutoscalingSpec(_Frozen):
    min_replica: int
    max_replica: int
    autoscaling_window: int
    scale_down_delay: int
    target_in_flight_tokens: int
    scale_down_policy: Literal["rate", "half_life"]
    max_scale_down_rate: float | None  # percent per scale_down_delay, for "rate"
    scale_down_half_life_seconds: int | None  # for "half_life"


class DeploymentSpec(_Frozen):
    spec_version: int = SPEC_VERSION
    plugin_version: str
    source_config_sha256: str
    model_name: str
    served_model_name: str
    description: str | None
    runtime_image_tag: str | None  # trt_llm.version_overrides.v2_llm_version
    checkpoint: CheckpointSpec
    weights: list[WeightsMount]  # every mount, the checkpoint's first when it has one
    hardware: HardwareSpec
    engine: EngineSpec
    parallel: ParallelSpec
    routing: RoutingConfig
    disaggregation: DisaggregationSpec
    speculation: SpeculationSpec | None
    autoscaling: AutoscalingSpec
    environment_variables: dict[str, str]
    secrets: list[str]
    model_metadata: dict[str, Any]

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, so equal specs give equal bytes."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def checkpoint_uri(repo: CheckpointRepository) -> str:
    """The weights-source URI that delivers a `checkpoint_repository`."""
    location = repo.repo
    match repo.source:
        case CheckpointSource.HF:
            return f"hf://{location}@{repo.revision}" if repo.revision else f"hf://{location}"
        case CheckpointSource.S3:
            return location if location.startswith("s3://") else f"s3://{location}"
        case CheckpointSource.GCS:
            return location if location.startswith("gs://") else f"gs://{location}"
        case CheckpointSource.AZURE:
            return location if location.startswith("azure://") else f"azure://{location}"
        case CheckpointSource.REMOTE_URL:
            return location
        case CheckpointSource.BASETEN_TRAINING:
            return f"bt://{location}@{repo.revision}" if repo.revision else f"bt://{location}"
        case CheckpointSource.LOCAL:
            return f"file://{location}"


def _default_model_name(config: BisllmConfig) -> str:
    repo = config.trt_llm.build.checkpoint_repository
    if repo is not None:
        return repo.repo.rstrip("/").rsplit("/", 1)[-1]
    return "bisllm-model"


def build_spec(config: BisllmConfig, source_text: str) -> DeploymentSpec:
    """Normalize a config that passed validation (stack v2, all rules satisfied)."""
    trt_llm = config.trt_llm
    if not isinstance(trt_llm, TrtLlmV2):
        raise ValueError("build_spec needs an inference_stack v2 config")
    build, runtime, llm = trt_llm.build, trt_llm.runtime, config.llm_config
    model_name = config.model_name or _default_model_name(config)

    mounts: list[WeightsMount] = []
    repo = build.checkpoint_repository
    if repo is not None:
        # Object stores always need the secret; HF only when the user declared it (gated repos);
        # a LOCAL directory is read without credentials.
        needs_secret = repo.source is not CheckpointSource.LOCAL and (
            repo.source is not CheckpointSource.HF or repo.runtime_secret_name in config.secrets
        )
        mounts.append(
            WeightsMount(
                source=checkpoint_uri(repo),
                mount_location=CHECKPOINT_MOUNT,
                secret_name=repo.runtime_secret_name if needs_secret else None,
            )
        )
    for source in config.weights:
        mounts.append(
            WeightsMount(
                source=source.source,
                mount_location=source.mount_location,
                secret_name=source.secret_name,
                auth=source.auth.model_dump(mode="json", exclude_none=True)
                if source.auth
                else None,
                allow_patterns=source.allow_patterns,
                ignore_patterns=source.ignore_patterns,
            )
        )
    model_path = llm.model_path or mounts[0].mount_location
    quantizes = build.quantization_type.value != "no_quant"
    checkpoint = CheckpointSpec(
        source_kind=repo.source.value if repo else "WEIGHTS",
        source_uri=mounts[0].source if repo else None,
        revision=repo.revision if repo else None,
        model_path=model_path,
        quantization=build.quantization_type.value,
        calibration=build.quantization_config.model_dump() if quantizes else None,
    )

    resources = config.resources
    accelerator = resources.accelerator
    info = GPU_INFO[accelerator.type] if accelerator else None
    hardware = HardwareSpec(
        accelerator=accelerator.type.value if accelerator else None,
        gpus_per_node=resources.gpus_per_node,
        node_count=resources.nodes,
        total_gpus=resources.total_gpus,
        compute_capability=info.compute_capability if info else None,
        gpu_memory_gib=info.memory_gib if info else None,
        cpu=resources.cpu,
        memory=resources.memory,
    )
    tp = runtime.tensor_parallel_size
    parallel = ParallelSpec(
        tensor_parallel_size=tp,
        data_parallel_size=llm.data_parallel_size,
        expert_parallel_size=llm.expert_parallel_size or 1,
        enable_attention_dp=llm.enable_attention_dp,
        attention_dp_size=tp if llm.enable_attention_dp else 1,
        world_size=tp * llm.data_parallel_size,
    )
    disagg = llm.b10_disagg_config
    disaggregation = DisaggregationSpec(
        enabled=llm.is_disaggregated,
        prefill_workers_per_replica=(disagg.prefill_workers_per_replica or 1) if disagg else 1,
        decode_workers_per_replica=(disagg.decode_workers_per_replica or 1) if disagg else 1,
    )
    speculative = llm.speculative_config
    speculation = (
        SpeculationSpec(
            decoding_type=speculative.decoding_type.value,
            max_draft_len=speculative.draft_len,
            speculative_model_dir=speculative.speculative_model_dir,
            num_nextn_predict_layers=speculative.num_nextn_predict_layers,
            eagle3_one_model=bool(speculative.eagle3_one_model),
        )
        if speculative
        else None
    )
    settings = config.autoscaling_settings
    metric_target = (
        config.additional_autoscaling_config.target("in_flight_tokens")
        if config.additional_autoscaling_config
        else None
    )
    half_life = llm.b10_autoscaling_config.scale_down_half_life_seconds
    autoscaling = AutoscalingSpec(
        min_replica=settings.min_replica,
        max_replica=settings.max_replica,
        autoscaling_window=settings.autoscaling_window,
        scale_down_delay=settings.scale_down_delay,
        target_in_flight_tokens=settings.target_in_flight_tokens
        or metric_target
        or DEFAULT_TARGET_IN_FLIGHT_TOKENS,
        scale_down_policy="half_life" if half_life else "rate",
        max_scale_down_rate=None
        if half_life
        else (settings.max_scale_down_rate or DEFAULT_MAX_SCALE_DOWN_RATE),
        scale_down_half_life_seconds=half_life,
    )
    return DeploymentSpec(
        plugin_version=__version__,
        source_config_sha256=hashlib.sha256(source_text.encode("utf-8")).hexdigest(),
        model_name=model_name,
        served_model_name=runtime.served_model_name or model_name,
        description=config.description,
        runtime_image_tag=trt_llm.version_overrides.v2_llm_version,
        checkpoint=checkpoint,
        weights=mounts,
        hardware=hardware,
        engine=EngineSpec(
            max_seq_len=runtime.max_seq_len,
            max_batch_size=runtime.max_batch_size,
            max_num_tokens=runtime.max_num_tokens,
            enable_chunked_prefill=runtime.enable_chunked_prefill,
            patch_kwargs=runtime.patch_kwargs,
        ),
        parallel=parallel,
        routing=llm.b10_routing_config,
        disaggregation=disaggregation,
        speculation=speculation,
        autoscaling=autoscaling,
        environment_variables={k: str(v) for k, v in config.environment_variables.items()},
        secrets=sorted(config.secrets),
        model_metadata=config.model_metadata,
    )
