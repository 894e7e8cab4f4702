"""The normalized spec: every default filled, derived values right, canonical JSON."""

from __future__ import annotations

import json

from conftest import base_config, check, with_value

from bisllm_truss.rules import CHECKPOINT_MOUNT


def test_defaults_are_filled(valid_spec):
    spec = valid_spec
    assert spec.model_name == "qwen3-moe"
    assert spec.served_model_name == "qwen3-moe"
    assert spec.engine.max_batch_size == 256
    assert spec.engine.max_num_tokens == 8192
    assert spec.engine.max_seq_len is None
    assert spec.engine.enable_chunked_prefill is True
    assert spec.parallel.model_dump() == {
        "tensor_parallel_size": 2,
        "data_parallel_size": 1,
        "expert_parallel_size": 1,
        "enable_attention_dp": False,
        "attention_dp_size": 1,
        "world_size": 2,
    }
    assert spec.routing.router_queue_policy == "fcfs"
    assert spec.routing.router_overlap_score_weight == 3.5
    assert spec.routing.router_temperature == 0.05
    assert spec.disaggregation.enabled is False
    assert spec.autoscaling.model_dump() == {
        "min_replica": 1,
        "max_replica": 1,
        "autoscaling_window": 300,
        "scale_down_delay": 300,
        "target_in_flight_tokens": 50_000,
        "scale_down_policy": "rate",
        "max_scale_down_rate": 20.0,
        "scale_down_half_life_seconds": None,
    }
    assert spec.hardware.accelerator == "H100"
    assert spec.hardware.compute_capability == 90
    assert spec.checkpoint.model_path == CHECKPOINT_MOUNT
    assert spec.checkpoint.calibration is None


def test_checkpoint_becomes_the_first_weights_mount():
    config = with_value("trt_llm.build.checkpoint_repository.revision", "abc123")
    config["weights"] = [{"source": "hf://org/eagle", "mount_location": "/models/eagle"}]
    spec = check(config).spec
    assert [(w.source, w.mount_location) for w in spec.weights] == [
        ("hf://Qwen/Qwen3-30B-A3B@abc123", CHECKPOINT_MOUNT),
        ("hf://org/eagle", "/models/eagle"),
    ]
    assert spec.weights[0].secret_name is None  # public HF repo: no secret declared


def test_private_checkpoints_carry_their_secret():
    config = with_value("secrets", {"hf_access_token": None})
    assert check(config).spec.weights[0].secret_name == "hf_access_token"
    s3 = with_value(
        "trt_llm.build.checkpoint_repository",
        {"source": "S3", "repo": "bucket/models/qwen", "runtime_secret_name": "aws_creds"},
    )
    spec = check(s3).spec
    assert (spec.weights[0].source, spec.weights[0].secret_name) == (
        "s3://bucket/models/qwen",
        "aws_creds",
    )


def test_half_life_policy_and_metric_target():
    config = with_value("llm_config.b10_autoscaling_config", {"scale_down_half_life_seconds": 600})
    config["additional_autoscaling_config"] = {
        "metrics": [{"name": "in_flight_tokens", "target": 30000}]
    }
    scaling = check(config).spec.autoscaling
    assert (scaling.scale_down_policy, scaling.scale_down_half_life_seconds) == ("half_life", 600)
    assert scaling.max_scale_down_rate is None
    assert scaling.target_in_flight_tokens == 30000


def test_quantization_keeps_calibration():
    spec = check(with_value("trt_llm.build.quantization_type", "fp8")).spec
    assert spec.checkpoint.quantization == "fp8"
    assert spec.checkpoint.calibration == {
        "calib_size": 1024,
        "calib_dataset": "abisee/cnn_dailymail",
        "calib_max_seq_length": 1536,
    }


def test_json_is_canonical_and_hash_tracks_source():
    text_a = "# comment\n" + json.dumps(base_config())
    text_b = json.dumps(base_config())
    a, b = check(text_a).spec, check(text_b).spec
    assert a.to_json() != b.to_json()  # different source bytes, different hash
    assert json.loads(a.to_json())["source_config_sha256"] != b.source_config_sha256
    assert a.to_json() == check(text_a).spec.to_json()
    keys = list(json.loads(a.to_json()))
    assert keys == sorted(keys)


def test_default_model_name_comes_from_the_checkpoint():
    config = base_config()
    del config["model_name"]
    assert check(config).spec.model_name == "Qwen3-30B-A3B"
