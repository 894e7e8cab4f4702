"""Every config field: its default, the edges of its range, and a value of the wrong type."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import base_config, check, with_value

# (dotted path, default as read from the validated config object, accepted, rejected)
FIELDS: list[tuple[str, Any, list[Any], list[Any]]] = [
    ("trt_llm.runtime.max_seq_len", None, [1, 1_048_576], [0, 1_048_577, "4096", 1.5]),
    ("trt_llm.runtime.max_batch_size", 256, [1, 2048], [0, 2049, "8"]),
    ("trt_llm.runtime.max_num_tokens", 8192, [65, 131_072], [64, 131_073, True]),
    ("trt_llm.runtime.enable_chunked_prefill", True, [True, False], ["sometimes"]),
    ("trt_llm.runtime.served_model_name", None, ["my-model"], ["", 12]),
    ("trt_llm.runtime.patch_kwargs", {}, [{"a": 1, "b": [1], "c": {"d": None}}], [[1], "x"]),
    ("trt_llm.build.quantization_type", "no_quant", ["no_quant", "fp8", "fp8_kv"], ["fp9", "int8"]),
    ("trt_llm.build.num_builder_gpus", None, [1, 16], [0, "2"]),
    ("trt_llm.build.skip_build_result", False, [True, False], ["no-thanks"]),
    ("trt_llm.build.quantization_config.calib_size", 1024, [64, 16384], [0, 100, 16448, "64"]),
    ("trt_llm.build.quantization_config.calib_max_seq_length", 1536, [64, 2048], [32, 1000, 20000]),
    ("trt_llm.build.quantization_config.calib_dataset", "abisee/cnn_dailymail", ["my/ds"], [5]),
    (
        "trt_llm.build.checkpoint_repository.runtime_secret_name",
        "hf_access_token",
        ["my_token"],
        [5],
    ),
    ("trt_llm.build.checkpoint_repository.revision", None, ["main", "6f6073b4"], [5]),
    ("trt_llm.version_overrides.v2_llm_version", None, ["0.2.0", "latest"], [1]),
    ("trt_llm.version_overrides.engine_builder_version", None, ["0.9.0"], ["v0.9"]),
    ("trt_llm.version_overrides.bei_version", None, ["1.0"], ["latest"]),
    ("description", None, ["Qwen3 MoE for chat"], [["a", "list"]]),
    ("resources.cpu", "1", ["4", "0.5", "500m", 8], ["four", "-1"]),
    ("resources.memory", "2Gi", ["64Gi", "512Mi", "1G"], ["lots", "12Qi"]),
    ("resources.node_count", None, [1], [0, "2"]),
    ("autoscaling_settings.min_replica", 1, [1, 5], [0, -1, "1"]),
    ("autoscaling_settings.max_replica", 1, [1, 100], [0]),
    ("autoscaling_settings.autoscaling_window", 300, [10, 3600], [9, 3601]),
    ("autoscaling_settings.scale_down_delay", 300, [0, 3600], [-1, 3601]),
    ("autoscaling_settings.max_scale_down_rate", None, [0.5, 100], [0, 101]),
    ("autoscaling_settings.target_in_flight_tokens", None, [1, 200_000], [0, "40k"]),
    ("llm_config.is_disaggregated", False, [False], ["maybe"]),
    ("llm_config.enable_attention_dp", False, [True, False], ["yes please"]),
    ("llm_config.expert_parallel_size", None, [1, 2], [0]),
    ("llm_config.data_parallel_size", 1, [1], [0]),
    ("llm_config.b10_routing_config.router_queue_policy", "fcfs", ["fcfs", "wspt"], ["lifo"]),
    ("llm_config.b10_routing_config.router_overlap_score_weight", 3.5, [0, 10.5], [-0.1]),
    ("llm_config.b10_routing_config.router_temperature", 0.05, [0, 1.0], [-1]),
    ("llm_config.b10_routing_config.router_prefill_token_discount", 0.35, [0, 1], [1.5]),
    ("llm_config.b10_routing_config.router_decode_token_discount", 0.8, [0, 1], [-0.5]),
    ("llm_config.b10_routing_config.router_session_affinity_score_multiplier", 0.5, [1.0], [2]),
    ("llm_config.b10_routing_config.router_active_replicas", 1, [1, 3], [0]),
    (
        "llm_config.b10_autoscaling_config.scale_down_half_life_seconds",
        None,
        [1, 1800],
        [0, "15m"],
    ),
]


def _read(config: Any, path: str) -> Any:
    node = config
    for key in path.split("."):
        node = getattr(node, key)
    return node.value if hasattr(node, "value") and not isinstance(node, str) else node


@pytest.mark.parametrize(("path", "default", "good", "bad"), FIELDS, ids=[f[0] for f in FIELDS])
def test_field_default_range_and_type(path: str, default: Any, good: list[Any], bad: list[Any]):
    baseline = check(base_config())
    assert baseline.ok, baseline.report()
    assert _read(baseline.config, path) == default

    for value in good:
        # Autoscaling bounds interact: keep max_replica >= any min_replica we try.
        config = with_value(path, value)
        config.setdefault("autoscaling_settings", {}).setdefault("max_replica", 100)
        result = check(config)
        assert result.ok, f"{path}={value!r} should be accepted:\n{result.report()}"

    for value in bad:
        result = check(with_value(path, value))
        assert not result.ok, f"{path}={value!r} should be rejected"
        assert [i.dotted_path for i in result.issues if i.dotted_path.startswith(path)], (
            f"{path}={value!r}: error not located at the field: {result.report()}"
        )


def test_v2_runtime_block_is_required():
    config = with_value("resources.accelerator", "H100:1")
    del config["trt_llm"]["runtime"]
    result = check(config)
    assert [i.dotted_path for i in result.issues] == ["trt_llm.runtime"]
    assert "required key 'runtime' is missing" in result.issues[0].message


def test_trt_llm_is_required():
    config = base_config()
    del config["trt_llm"]
    result = check(config)
    assert [i.dotted_path for i in result.issues] == ["trt_llm"]


def test_absent_inference_stack_means_v1():
    config = base_config()
    del config["trt_llm"]["inference_stack"]
    del config["trt_llm"]["runtime"]
    result = check(config)
    assert result.config is None
    assert any("config is v1" in i.message for i in result.issues)


def test_unknown_inference_stack_value():
    result = check(with_value("trt_llm.inference_stack", "v3", base_config()))
    assert [i.dotted_path for i in result.issues] == ["trt_llm.inference_stack"]
    assert "expected one of: v1, v2" in result.issues[0].message


def test_gated_features_is_an_alias_of_patch_kwargs():
    config = base_config()
    config["trt_llm"]["runtime"]["gated_features"] = {"enable_foo": True}
    result = check(config)
    assert result.ok, result.report()
    assert result.config.trt_llm.runtime.patch_kwargs == {"enable_foo": True}


@pytest.mark.parametrize("key", ["max_batch_size", "build_config"])
def test_patch_kwargs_must_not_shadow_runtime_fields(key: str):
    result = check(with_value("trt_llm.runtime.patch_kwargs", {key: 1}))
    assert [i.dotted_path for i in result.issues] == [f"trt_llm.runtime.patch_kwargs.{key}"]


@pytest.mark.parametrize(
    ("text", "accepted"),
    [("H100", True), ("B200:4", False), ("h100:2", True), ("H100:0", False), ("H100:x", False)],
)
def test_accelerator_spec(text: str, accepted: bool):
    # H100 / h100:2 are the only ones that also fit tensor_parallel_size 2 on one GPU count rule.
    config = with_value("resources.accelerator", text)
    config["trt_llm"]["runtime"]["tensor_parallel_size"] = 1 if ":" not in text else 2
    result = check(config)
    assert result.ok is accepted, result.report()


def test_environment_values_become_strings_like_truss():
    config = with_value("environment_variables", {"FLAG": True, "N": 3, "NAME": "x"})
    result = check(config)
    assert result.spec.environment_variables == {"FLAG": "true", "N": "3", "NAME": "x"}


def test_secrets_are_names():
    result = check(with_value("secrets", {"hf_access_token": None}))
    assert result.spec.secrets == ["hf_access_token"]


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("hf://owner/repo@rev", None),
        ("s3://bucket/path", "secret_id is required"),
        ("gs://bucket/path", "no credentials configured"),
        ("r2://acct.bucket/path", "secret_id is required"),
        ("https://example.com/model.tar.gz", None),
        ("file:///data/model", None),
        ("ftp://host/x", "unsupported source scheme"),
        ("owner/repo", "has no URI scheme"),
        ("s3://bucket/path@v1", "only valid for hf://"),
        ("hf://justone", "expected hf://owner/repo"),
    ],
)
def test_weights_source(source: str, error: str | None):
    result = check(with_value("weights", [{"source": source, "mount_location": "/models/x"}]))
    if error is None:
        assert result.ok, result.report()
    else:
        assert any(error in i.message for i in result.issues), result.report()
        assert all(i.dotted_path.startswith("weights[0]") for i in result.issues)


def test_weights_auth_methods():
    ok = {
        "source": "s3://bucket/m",
        "mount_location": "/models/m",
        "auth": {
            "auth_method": "aws_oidc",
            "aws_oidc_role_arn": "arn:x",
            "aws_oidc_region": "us-east-1",
        },
    }
    assert check(with_value("weights", [ok])).ok
    bad = dict(ok, auth={"auth_method": "AWS_OIDC", "auth_secret_name": "s"})
    result = check(with_value("weights", [bad]))
    paths = sorted(i.dotted_path for i in result.issues)
    assert paths == [
        "weights[0].auth.auth_secret_name",
        "weights[0].auth.aws_oidc_region",
        "weights[0].auth.aws_oidc_role_arn",
    ]
    with_secret = {"source": "s3://bucket/m", "mount_location": "/m", "auth_secret_name": "aws"}
    assert check(with_value("weights", [with_secret])).ok


@pytest.mark.parametrize("mount", ["models/x", "/", "/models/../etc"])
def test_mount_location_must_be_absolute(mount: str):
    result = check(with_value("weights", [{"source": "hf://a/b", "mount_location": mount}]))
    assert [i.dotted_path for i in result.issues] == ["weights[0].mount_location"]


def test_autoscaling_metrics():
    metric = {"metrics": [{"name": "in_flight_tokens", "target": 40000}]}
    result = check(with_value("additional_autoscaling_config", metric))
    assert result.spec.autoscaling.target_in_flight_tokens == 40000
    bad = {"metrics": [{"name": "concurrency", "target": 4}]}
    result = check(with_value("additional_autoscaling_config", bad))
    assert [i.dotted_path for i in result.issues] == [
        "additional_autoscaling_config.metrics[0].name"
    ]
    empty = check(with_value("additional_autoscaling_config", {"metrics": []}))
    assert not empty.ok


@pytest.mark.parametrize(
    ("decoding_type", "extra", "problem"),
    [
        ("NGram", {}, None),
        ("ngram", {"max_draft_len": 8}, None),
        ("EAGLE", {"speculative_model_dir": "/models/checkpoint/eagle"}, None),
        ("Eagle", {"speculative_model_dir": "/nowhere"}, "not inside any `weights` mount_location"),
        ("Eagle", {}, "speculative_model_dir is required when decoding_type is Eagle"),
        ("MTP", {}, "num_nextn_predict_layers is required when decoding_type is MTP"),
        ("mtp", {"num_nextn_predict_layers": 1}, None),
        ("NGram", {"num_nextn_predict_layers": 1}, "only applies to MTP"),
        ("MTP", {"num_nextn_predict_layers": 1, "eagle3_one_model": True}, "only applies to Eagle"),
        ("NGram", {"max_draft_len": 0}, "greater than or equal to 1"),
        ("Medusa", {}, "Input should be"),
    ],
)
def test_speculative_config(decoding_type: str, extra: dict, problem: str | None):
    block = {"decoding_type": decoding_type, **extra}
    result = check(with_value("llm_config.speculative_config", block))
    if problem is None:
        assert result.ok, result.report()
        assert result.spec.speculation.decoding_type.lower() == decoding_type.lower()
    else:
        assert any(problem in i.message for i in result.issues), result.report()


def test_speculation_defaults():
    result = check(with_value("llm_config.speculative_config", {"decoding_type": "NGram"}))
    assert result.spec.speculation.max_draft_len == 4
    assert check(base_config()).spec.speculation is None


def test_legacy_quantization_is_refused_under_v2():
    result = check(with_value("trt_llm.build.quantization_type", "weights_int8"))
    assert [i.dotted_path for i in result.issues] == ["trt_llm.build.quantization_type"]
    assert "not supported by the v2 inference stack" in result.issues[0].message
