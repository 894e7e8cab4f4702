"""Error reporting: documented messages, exact positions, did-you-mean, every error at once."""

from __future__ import annotations

import textwrap

import pytest
from conftest import base_config, check, messages, with_value

NESTED = textwrap.dedent(
    """\
    model_name: demo          # line 1
    resources:
      accelerator: H100:2
    trt_llm:
      inference_stack: v2
      build:
        checkpoint_repository:
          source: HF
          repo: Qwen/Qwen3-30B-A3B
          revison: main
      runtime:
        tensor_parallel_size: 2
        max_batch_size: 4096
    weights:
      - source: hf://a/b
        mount_location: /models/b
      - source: hf://a/c
        mount_location: /models/b
    llm_config:
      b10_routing_config:
        router_queue_policy: fcfss
    """
)


def test_errors_carry_yaml_path_line_and_column():
    result = check(NESTED)
    found = {(i.dotted_path, i.line, i.column) for i in result.issues}
    assert found == {
        ("trt_llm.build.checkpoint_repository.revison", 10, 7),
        ("trt_llm.runtime.max_batch_size", 13, 5),
        ("weights[1].mount_location", 18, 5),
        ("llm_config.b10_routing_config.router_queue_policy", 21, 5),
    }
    rendered = result.report().splitlines()
    assert rendered[0].startswith("config.yaml:10:7: trt_llm.build.checkpoint_repository.revison:")


def test_did_you_mean_for_keys_and_values():
    result = check(NESTED)
    hints = {i.dotted_path: i.hint for i in result.issues}
    assert hints["trt_llm.build.checkpoint_repository.revison"] == "did you mean 'revision'?"
    assert hints["llm_config.b10_routing_config.router_queue_policy"] == "did you mean 'fcfs'?"
    unknown = next(i for i in result.issues if i.dotted_path.endswith("revison"))
    assert "unknown key 'revison'" in unknown.message
    assert "expected one of: repo, revision, runtime_secret_name, source" in unknown.message


def test_did_you_mean_at_top_level_and_for_accelerators():
    result = check(with_value("autoscaling_setings", {}))
    assert result.issues[0].hint == "did you mean 'autoscaling_settings'?"
    result = check(with_value("resources.accelerator", "H10:2"))
    assert "did you mean 'H100'?" in result.issues[0].message


def test_every_error_is_reported_at_once():
    config = base_config()
    config["resources"] = {"accelerator": "A100:2", "cpu": "lots"}
    config["trt_llm"]["build"]["quantization_type"] = "fp8"
    config["trt_llm"]["build"]["base_model"] = "encoder"
    config["trt_llm"]["runtime"] = {"tensor_parallel_size": 4, "max_num_tokens": 10}
    config["weights"] = [{"source": "hf://a/b", "mount_location": "/models/checkpoint"}]
    config["autoscaling_settings"] = {"concurrency_target": 8, "min_replica": 0}
    config["llm_config"] = {
        "is_disaggregated": True,
        "speculative_config": {"decoding_type": "MTP"},
    }
    config["extra_top_level"] = 1
    result = check(config)
    paths = sorted({i.dotted_path for i in result.issues})
    assert paths == [
        "autoscaling_settings.concurrency_target",
        "autoscaling_settings.min_replica",
        "extra_top_level",
        "llm_config.is_disaggregated",
        "llm_config.speculative_config.num_nextn_predict_layers",
        "resources.cpu",
        "trt_llm.build.base_model",
        "trt_llm.build.quantization_type",
        "trt_llm.runtime.max_num_tokens",
        "trt_llm.runtime.tensor_parallel_size",
        "weights[0].mount_location",
    ]


# Documented BIS-LLM / Truss / BDN error strings, each triggered by a minimal change.
DOCUMENTED = [
    (
        with_value("trt_llm.build.base_model", "encoder"),
        "trt_llm.build.base_model",
        "Field trt_llm.build.base_model is not allowed to be set when using v2 inference stack",
    ),
    (
        with_value("trt_llm.build.max_seq_len", 4096),
        "trt_llm.build.max_seq_len",
        "Field trt_llm.build.max_seq_len is not allowed to be set when using v2 inference stack",
    ),
    (
        with_value("trt_llm.build.tensor_parallel_count", 2),
        "trt_llm.build.tensor_parallel_count",
        "Field trt_llm.build.tensor_parallel_count is not allowed to be set when using v2 inference stack",
    ),
    (
        with_value(
            "trt_llm.build.speculator",
            {
                "speculative_decoding_mode": "LOOKAHEAD_DECODING",
                "lookahead_windows_size": 7,
                "lookahead_ngram_size": 5,
                "lookahead_verification_set_size": 3,
            },
        ),
        "trt_llm.build.speculator",
        "Field trt_llm.build.speculator is not allowed to be set when using v2 inference stack",
    ),
    (
        with_value(
            "trt_llm.build.plugin_configuration",
            {"paged_kv_cache": True, "use_fp8_context_fmha": True},
        ),
        "trt_llm.build.plugin_configuration",
        "Field trt_llm.build.plugin_configuration is not allowed to be set when using v2 inference stack",
    ),
    (
        with_value("trt_llm.build", {"quantization_type": "no_quant"}),
        "trt_llm.build.checkpoint_repository",
        "trt_llm.build.checkpoint_repository is required when trt_llm.build.skip_build_result is not set for v2 inference stack.",
    ),
    (
        with_value("trt_llm.build.quantization_config", {"calib_size": 32}),
        "trt_llm.build.quantization_config.calib_size",
        "calib_size must be between 64 and 16384, but got 32",
    ),
    (
        with_value("trt_llm.build.quantization_config", {"calib_max_seq_length": 1000}),
        "trt_llm.build.quantization_config.calib_max_seq_length",
        "calib_max_seq_length must be a multiple of 64, but got 1000",
    ),
    (
        with_value(
            "trt_llm.build.checkpoint_repository", {"source": "HF", "repo": "not a/valid//repo"}
        ),
        "trt_llm.build.checkpoint_repository.repo",
        "HuggingFace repository validation failed:",
    ),
    (
        with_value(
            "trt_llm.build.quantization_type", "fp8", with_value("resources.accelerator", "A100:2")
        ),
        "trt_llm.build.quantization_type",
        "FP8 quantization is only supported on L4, H100, H200, B200 accelerators or newer (CUDA_COMPUTE>=89)",
    ),
    (
        with_value("trt_llm.build.quantization_type", "fp4"),
        "trt_llm.build.quantization_type",
        "FP4 quantization is only supported on B200 / Blackwell accelerators or newer (CUDA_COMPUTE>=100)",
    ),
    (
        with_value(
            "weights",
            [
                {"source": "hf://a/b", "mount_location": "/models/x"},
                {"source": "hf://a/c", "mount_location": "/models/x"},
            ],
        ),
        "weights[1].mount_location",
        "Duplicate mount_location '/models/x' - each weights source must have a unique mount path.",
    ),
    (
        with_value("trt_llm.version_overrides", {"briton_version": "v0.1"}),
        "trt_llm.version_overrides.briton_version",
        "briton_version must start with a number",
    ),
    (
        with_value("trt_llm.build.base_model", "llama"),
        "trt_llm.build.base_model",
        "was renamed to `decoder`",
    ),
    (
        with_value("resources.accelerator", "T4"),
        "resources.accelerator",
        "BIS-LLM is not supported on CUDA_COMPUTE_75 (T4) and CUDA_COMPUTE_70 (V100) GPUs",
    ),
    (
        with_value(
            "llm_config.b10_disagg_config",
            {"prefill_workers_per_replica": 1, "decode_workers_per_replica": 2},
        ),
        "llm_config.b10_disagg_config",
        "b10_disagg_config is set but is_disaggregated is not true",
    ),
    (
        with_value(
            "llm_config",
            {"is_disaggregated": True, "b10_disagg_config": {"prefill_workers_per_replica": 1}},
        ),
        "llm_config.b10_disagg_config.decode_workers_per_replica",
        "b10_disagg_config.decode_workers_per_replica is required when is_disaggregated is true",
    ),
    (
        with_value(
            "llm_config",
            {
                "is_disaggregated": True,
                "b10_disagg_config": {
                    "prefill_workers_per_replica": 0,
                    "decode_workers_per_replica": 1,
                },
            },
        ),
        "llm_config.b10_disagg_config.prefill_workers_per_replica",
        "greater than or equal to 1",
    ),
    (
        with_value("autoscaling_settings", {"target_utilization_percentage": 70}),
        "autoscaling_settings.target_utilization_percentage",
        "target_utilization_percentage is not supported with inference_stack v2",
    ),
    (
        with_value("autoscaling_settings", {"min_replica": 0}),
        "autoscaling_settings.min_replica",
        "min_replica must be at least 1 (BIS-LLM does not scale to zero)",
    ),
    (
        with_value("autoscaling_settings", {"min_replica": 3, "max_replica": 2}),
        "autoscaling_settings.max_replica",
        "max_replica (2) must be >= min_replica (3)",
    ),
]


@pytest.mark.parametrize(
    ("config", "path", "text"), DOCUMENTED, ids=[d[1] + ":" + d[2][:30] for d in DOCUMENTED]
)
def test_documented_error_strings(config, path, text):
    result = check(config)
    assert not result.ok
    matching = [i for i in result.issues if i.dotted_path == path and text in i.message]
    assert matching, "\n".join(messages(result))


def test_v1_build_field_at_its_default_is_accepted_under_v2():
    # Truss compares against defaults: `base_model: decoder` or `max_batch_size: 256` pass.
    config = with_value("trt_llm.build.base_model", "decoder")
    config["trt_llm"]["build"]["max_batch_size"] = 256
    config["trt_llm"]["build"]["tensor_parallel_count"] = 1
    assert check(config).ok


def test_checkpoint_repository_optional_with_skip_build_result_and_weights():
    config = with_value("trt_llm.build", {"skip_build_result": True})
    config["weights"] = [{"source": "hf://org/engine", "mount_location": "/models/engine"}]
    result = check(config)
    assert result.ok, result.report()
    assert result.spec.checkpoint.model_path == "/models/engine"
    lonely = check(with_value("trt_llm.build", {"skip_build_result": True}))
    assert [i.dotted_path for i in lonely.issues] == ["trt_llm.build.skip_build_result"]


def test_v1_config_gets_a_migrate_hint():
    config = base_config()
    config["trt_llm"] = {
        "build": {
            "base_model": "decoder",
            "checkpoint_repository": {"source": "HF", "repo": "a/b"},
            "tensor_parallel_count": 2,
        }
    }
    result = check(config)
    assert [i.dotted_path for i in result.issues] == ["trt_llm.inference_stack"]
    assert result.issues[0].line == 5  # no inference_stack key: points at the trt_llm block
    assert "Run `bisllm migrate CONFIG`" in result.issues[0].message


def test_v1_rules_still_apply_to_v1_configs():
    config = base_config()
    config["trt_llm"] = {"build": {"tensor_parallel_count": 1}}
    result = check(config)
    text = "\n".join(messages(result))
    assert "trt_llm.build.checkpoint_repository is required for v1 inference stack." in text
    assert "Tensor parallelism and GPU count must be the same for TRT-LLM" in text


def test_parallel_layout_is_checked_against_gpus():
    config = with_value("trt_llm.runtime.tensor_parallel_size", 8)
    result = check(config)
    assert [i.dotted_path for i in result.issues] == ["trt_llm.runtime.tensor_parallel_size"]
    assert "must equal the GPUs of one replica" in result.issues[0].message

    two_nodes = with_value(
        "resources.node_count", 2, with_value("trt_llm.runtime.tensor_parallel_size", 4)
    )
    assert check(two_nodes).ok
    data_parallel = with_value(
        "llm_config.data_parallel_size", 2, with_value("trt_llm.runtime.tensor_parallel_size", 1)
    )
    assert check(data_parallel).ok
    ep = check(with_value("llm_config.expert_parallel_size", 3))
    assert [i.dotted_path for i in ep.issues] == ["llm_config.expert_parallel_size"]
    attention_dp = with_value(
        "llm_config.enable_attention_dp", True, with_value("resources.accelerator", "H100:1")
    )
    attention_dp["trt_llm"]["runtime"]["tensor_parallel_size"] = 1
    assert [i.dotted_path for i in check(attention_dp).issues] == ["llm_config.enable_attention_dp"]


def test_cpu_only_deployment_is_not_checked_against_gpus():
    config = base_config()
    config["resources"] = {"cpu": "8", "memory": "16Gi"}
    result = check(config)
    assert result.ok, result.report()
    assert result.spec.hardware.total_gpus == 0


def test_use_gpu_must_agree_with_accelerator():
    config = base_config()
    config["resources"] = {"use_gpu": True}
    config["trt_llm"]["runtime"]["tensor_parallel_size"] = 1
    assert [i.dotted_path for i in check(config).issues] == ["resources.use_gpu"]


def test_scale_down_policies_are_exclusive():
    config = with_value("autoscaling_settings.max_scale_down_rate", 10)
    config["llm_config"] = {"b10_autoscaling_config": {"scale_down_half_life_seconds": 900}}
    paths = [i.dotted_path for i in check(config).issues]
    assert paths == ["llm_config.b10_autoscaling_config.scale_down_half_life_seconds"]


def test_conflicting_token_targets():
    config = with_value("autoscaling_settings.target_in_flight_tokens", 1000)
    config["additional_autoscaling_config"] = {
        "metrics": [{"name": "in_flight_tokens", "target": 2000}]
    }
    paths = [i.dotted_path for i in check(config).issues]
    assert paths == ["additional_autoscaling_config.metrics[0].target"]


def test_model_path_must_be_under_a_mount():
    config = with_value("llm_config.model_path", "/elsewhere/model")
    assert [i.dotted_path for i in check(config).issues] == ["llm_config.model_path"]
    inside = with_value("llm_config.model_path", "/models/checkpoint/sub")
    assert check(inside).spec.checkpoint.model_path == "/models/checkpoint/sub"


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("model_name: [unclosed\n", (2, 1), "invalid YAML"),
        ("a: 1\na: 2\n", (2, 1), "duplicate key 'a'"),
        ("model_name: x\n  bad indent: 1\n", (2, 13), "invalid YAML"),
        ("- just\n- a list\n", (1, 1), "expected a mapping"),
        ("", (1, 1), "empty file"),
    ],
)
def test_malformed_yaml(text: str, where: tuple[int, int], what: str):
    result = check(text)
    assert len(result.issues) == 1
    issue = result.issues[0]
    assert what in issue.message
    assert (issue.line, issue.column) == where


def test_wrong_types_name_the_expected_type():
    result = check(with_value("trt_llm.runtime.max_batch_size", "lots"))
    issue = result.issues[0]
    assert issue.dotted_path == "trt_llm.runtime.max_batch_size"
    assert "valid integer" in issue.message and "'lots'" in issue.message
    result = check(with_value("weights", {"source": "hf://a/b"}))
    assert result.issues[0].dotted_path == "weights"
    assert "valid list" in result.issues[0].message


def test_prompts_must_fit_a_batch_without_chunked_prefill():
    config = with_value("trt_llm.runtime.enable_chunked_prefill", False)
    config["trt_llm"]["runtime"]["max_seq_len"] = 32768
    paths = [i.dotted_path for i in check(config).issues]
    assert paths == ["trt_llm.runtime.enable_chunked_prefill"]
    config["trt_llm"]["runtime"]["max_num_tokens"] = 32768
    assert check(config).ok
