"""Checks that span several blocks (hardware × quantization, parallel layout, mounts, autoscaling).

Each rule reads the few values it needs through `Facts`, one leaf at a time, so an unrelated error
in the same block does not hide it: all errors are reported at once. A rule whose inputs are
themselves invalid is skipped (those inputs are already reported).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bisllm_truss.facts import Facts, Unavailable
from bisllm_truss.hardware import FP4_MIN_COMPUTE, FP8_MIN_COMPUTE, GPU_INFO, Accelerator
from bisllm_truss.issues import Path

# Where the checkpoint named by trt_llm.build.checkpoint_repository is mounted in the container.
CHECKPOINT_MOUNT = "/models/checkpoint"

FP8_MESSAGE = (
    "FP8 quantization is only supported on L4, H100, H200, B200 accelerators or newer "
    "(CUDA_COMPUTE>=89)"
)
FP4_MESSAGE = (
    "FP4 quantization is only supported on B200 / Blackwell accelerators or newer "
    "(CUDA_COMPUTE>=100)"
)

Violations = list[tuple[Path, str]]


def _stack_is_v2(f: Facts) -> Violations:
    if f.stack() == "v2":
        return []
    return [
        (
            ("trt_llm", "inference_stack"),
            "bisllm serves the v2 inference stack (BIS-LLM), but this config is v1 "
            "(Engine-Builder-LLM); expected inference_stack: v2. Run `bisllm migrate CONFIG` "
            "to convert it",
        )
    ]


def _accelerator_supported(f: Facts) -> Violations:
    spec = f.get("resources", "accelerator")
    if spec is None or spec.type not in (Accelerator.T4, Accelerator.V100):
        return []
    return [
        (
            ("resources", "accelerator"),
            "BIS-LLM is not supported on CUDA_COMPUTE_75 (T4) and CUDA_COMPUTE_70 (V100) GPUs; "
            "expected an accelerator with CUDA compute >= 80 (A10G, A100, L4, L40S, H100, H200, "
            "B200, ...)",
        )
    ]


def _quantization_fits_hardware(f: Facts) -> Violations:
    quantization = f.get("trt_llm", "build", "quantization_type")
    if not (quantization.is_fp8_family or quantization.is_fp4_family):
        return []
    path: Path = ("trt_llm", "build", "quantization_type")
    spec = f.get("resources", "accelerator")
    if spec is None:
        return [(path, f"{FP8_MESSAGE}; resources.accelerator is not set")]
    compute = GPU_INFO[spec.type].compute_capability
    if compute < FP8_MIN_COMPUTE:
        return [(path, f"{FP8_MESSAGE}; got {quantization.value} on {spec.type.value}")]
    if quantization.is_fp4_family and compute < FP4_MIN_COMPUTE:
        return [(path, f"{FP4_MESSAGE}; got {quantization.value} on {spec.type.value}")]
    return []


def _multi_node_needs_gpus(f: Facts) -> Violations:
    nodes = f.get("resources", "node_count")
    if nodes and nodes > 1 and f.get("resources", "accelerator") is None:
        return [
            (("resources", "node_count"), "node_count > 1 needs resources.accelerator (GPU nodes)")
        ]
    return []


def _gpus_per_replica(f: Facts) -> tuple[Any, int]:
    spec = f.get("resources", "accelerator")
    nodes = f.get("resources", "node_count") or 1
    return spec, (spec.count * nodes if spec else 0)


def _v1_world_size(f: Facts) -> Violations:
    if f.stack() != "v1":
        return []
    world = 1
    for name in ("tensor_parallel_count", "pipeline_parallel_count", "sequence_parallel_count"):
        world *= f.get("trt_llm", "build", name)
    spec = f.get("resources", "accelerator")
    if spec is None or world == spec.count:
        return []
    return [
        (
            ("trt_llm", "build", "tensor_parallel_count"),
            "Tensor parallelism and GPU count must be the same for TRT-LLM: tensor × pipeline × "
            f"sequence parallel = {world}, resources.accelerator has {spec.count}",
        )
    ]


def _v2_world_size(f: Facts) -> Violations:
    if f.stack() != "v2":
        return []
    tp = f.get("trt_llm", "runtime", "tensor_parallel_size")
    dp = f.get("llm_config", "data_parallel_size")
    spec, gpus = _gpus_per_replica(f)
    if spec is None or tp * dp == gpus:
        return []
    nodes = f.get("resources", "node_count") or 1
    return [
        (
            ("trt_llm", "runtime", "tensor_parallel_size"),
            f"tensor_parallel_size ({tp}) × llm_config.data_parallel_size ({dp}) = {tp * dp} "
            f"must equal the GPUs of one replica: resources.accelerator {spec} × node_count "
            f"{nodes} = {gpus}",
        )
    ]


def _expert_parallel_divides(f: Facts) -> Violations:
    ep = f.get("llm_config", "expert_parallel_size")
    if ep is None or f.stack() != "v2":
        return []
    world = f.get("trt_llm", "runtime", "tensor_parallel_size") * f.get(
        "llm_config", "data_parallel_size"
    )
    if world % ep == 0:
        return []
    return [
        (
            ("llm_config", "expert_parallel_size"),
            f"expert_parallel_size ({ep}) must divide the number of ranks "
            f"(tensor_parallel_size × data_parallel_size = {world})",
        )
    ]


def _attention_dp_needs_tp(f: Facts) -> Violations:
    if f.stack() != "v2" or not f.get("llm_config", "enable_attention_dp"):
        return []
    if f.get("trt_llm", "runtime", "tensor_parallel_size") > 1:
        return []
    return [
        (
            ("llm_config", "enable_attention_dp"),
            "enable_attention_dp splits attention across the tensor-parallel ranks; "
            "it needs tensor_parallel_size > 1",
        )
    ]


def _mount_locations(f: Facts) -> list[tuple[int, str]]:
    mounts = []
    for i in range(f.count("weights")):
        try:
            mounts.append((i, f.get("weights", i, "mount_location")))
        except Unavailable:
            continue
    return mounts


def _all_mounts(f: Facts) -> list[str]:
    """Every mount point in the container: the weights entries and the checkpoint's."""
    mounts = [m for _, m in _mount_locations(f)]
    if f.is_set("trt_llm", "build", "checkpoint_repository"):
        mounts.append(CHECKPOINT_MOUNT)
    return mounts


def _under_any(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _checkpoint_has_a_home(f: Facts) -> Violations:
    if f.stack() != "v2":
        return []
    has_repo = f.is_set("trt_llm", "build", "checkpoint_repository")
    model_path = f.get("llm_config", "model_path")
    mounts = _all_mounts(f)
    no_source = not has_repo and not f.count("weights") and model_path is None
    if no_source and f.get("trt_llm", "build", "skip_build_result"):
        return [
            (
                ("trt_llm", "build", "skip_build_result"),
                "skip_build_result without checkpoint_repository needs the checkpoint from a "
                "`weights` entry (or llm_config.model_path); none is configured",
            )
        ]
    if model_path is None or _under_any(model_path, mounts):
        return []
    return [
        (
            ("llm_config", "model_path"),
            f"model_path '{model_path}' is not inside any weights mount_location "
            f"(expected a path under one of: {', '.join(mounts) or 'no mounts configured'})",
        )
    ]


def _draft_head_is_mounted(f: Facts) -> Violations:
    directory = f.get("llm_config", "speculative_config", "speculative_model_dir")
    if directory is None:
        return []
    mounts = _all_mounts(f)
    if _under_any(directory, mounts):
        return []
    return [
        (
            ("llm_config", "speculative_config", "speculative_model_dir"),
            f"speculative_model_dir '{directory}' is not inside any `weights` mount_location; "
            "add a weights entry for the draft head (expected a path under one of: "
            f"{', '.join(mounts) or 'no weights configured'})",
        )
    ]


def _prompts_fit_without_chunking(f: Facts) -> Violations:
    if f.stack() != "v2" or f.get("trt_llm", "runtime", "enable_chunked_prefill"):
        return []
    max_seq_len = f.get("trt_llm", "runtime", "max_seq_len")
    max_num_tokens = f.get("trt_llm", "runtime", "max_num_tokens")
    if max_seq_len is None or max_seq_len <= max_num_tokens:
        return []
    return [
        (
            ("trt_llm", "runtime", "enable_chunked_prefill"),
            f"with enable_chunked_prefill: false a whole prompt must fit in one batch, but "
            f"max_seq_len ({max_seq_len}) > max_num_tokens ({max_num_tokens}); enable chunked "
            "prefill or raise max_num_tokens",
        )
    ]


def _unique_mounts(f: Facts) -> Violations:
    taken = {CHECKPOINT_MOUNT} if f.is_set("trt_llm", "build", "checkpoint_repository") else set()
    violations: Violations = []
    for i, location in _mount_locations(f):
        if location in taken:
            message = (
                f"Duplicate mount_location '{location}' - "
                "each weights source must have a unique mount path."
            )
            if location == CHECKPOINT_MOUNT:
                message += " (trt_llm.build.checkpoint_repository is mounted there)"
            violations.append((("weights", i, "mount_location"), message))
        taken.add(location)
    return violations


def _token_based_autoscaling(f: Facts) -> Violations:
    if f.stack() != "v2":
        return []
    advice = (
        "BIS-LLM scales on in-flight tokens; set additional_autoscaling_config.metrics "
        "[{name: in_flight_tokens, target: N}] instead (N ≈ concurrency_target × tokens per "
        "request; `bisllm migrate` estimates it)"
    )
    return [
        (
            ("autoscaling_settings", name),
            f"{name} is not supported with inference_stack v2: {advice}",
        )
        for name in ("concurrency_target", "target_utilization_percentage")
        if f.is_set("autoscaling_settings", name)
    ]


def _one_token_target(f: Facts) -> Violations:
    direct = f.get("autoscaling_settings", "target_in_flight_tokens")
    if direct is None:
        return []
    violations: Violations = []
    for i in range(f.count("additional_autoscaling_config", "metrics")):
        metric = ("additional_autoscaling_config", "metrics", i)
        if f.raw(*metric, "name") != "in_flight_tokens":
            continue
        target = f.get(*metric, "target")
        if target != direct:
            violations.append(
                (
                    (*metric, "target"),
                    f"target {target} disagrees with autoscaling_settings.target_in_flight_tokens "
                    f"({direct}); set it in one place",
                )
            )
    return violations


def _one_scale_down_policy(f: Facts) -> Violations:
    half_life = f.get("llm_config", "b10_autoscaling_config", "scale_down_half_life_seconds")
    if half_life is None or f.get("autoscaling_settings", "max_scale_down_rate") is None:
        return []
    return [
        (
            ("llm_config", "b10_autoscaling_config", "scale_down_half_life_seconds"),
            "set either autoscaling_settings.max_scale_down_rate or "
            "scale_down_half_life_seconds, not both: they are two scale-down policies",
        )
    ]


def _disaggregation_unit(f: Facts) -> Violations:
    enabled = f.get("llm_config", "is_disaggregated")
    unit = ("llm_config", "b10_disagg_config")
    if not enabled:
        if f.is_set(*unit):
            return [
                (
                    unit,
                    "b10_disagg_config is set but is_disaggregated is not true; "
                    "set is_disaggregated: true or remove b10_disagg_config",
                )
            ]
        return []
    where = unit if f.is_set(*unit) else ("llm_config", "is_disaggregated")
    return [
        (
            (*where, name) if where == unit else where,
            f"b10_disagg_config.{name} is required when is_disaggregated is true (an integer >= 1)",
        )
        for name in ("prefill_workers_per_replica", "decode_workers_per_replica")
        if not f.is_set(*unit, name)
    ]


RULES: tuple[Callable[[Facts], Violations], ...] = (
    _stack_is_v2,
    _accelerator_supported,
    _quantization_fits_hardware,
    _multi_node_needs_gpus,
    _v1_world_size,
    _v2_world_size,
    _expert_parallel_divides,
    _attention_dp_needs_tp,
    _checkpoint_has_a_home,
    _unique_mounts,
    _draft_head_is_mounted,
    _prompts_fit_without_chunking,
    _token_based_autoscaling,
    _one_token_target,
    _one_scale_down_policy,
    _disaggregation_unit,
)


def run_rules(data: dict[str, Any]) -> Violations:
    """Every cross-block violation in the raw config `data` (rules with invalid inputs skip)."""
    facts = Facts(data)
    violations: Violations = []
    for rule in RULES:
        try:
            violations.extend(rule(facts))
        except Unavailable:
            continue
    return violations
