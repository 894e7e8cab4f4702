"""Tests for the v1 (Engine-Builder-LLM) → v2 (BIS-LLM) config migration."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bisllm_truss.migrate import Migration, MigrationError, migrate_text

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "v1-llama-3.3-70b-engine-builder.yaml"

V1_ONLY_BUILD = {
    "base_model",
    "max_seq_len",
    "max_batch_size",
    "max_num_tokens",
    "tensor_parallel_count",
    "plugin_configuration",
    "speculator",
    "max_beam_width",
    "max_prompt_embedding_table_size",
    "gather_all_token_logits",
    "strongly_typed",
    "pipeline_parallel_count",
    "sequence_parallel_count",
    "moe_expert_parallel_option",
    "lora_adapters",
    "lora_configuration",
}
V1_ONLY_RUNTIME = {
    "kv_cache_free_gpu_mem_fraction",
    "kv_cache_host_memory_bytes",
    "batch_scheduler_policy",
    "total_token_limit",
    "request_default_max_tokens",
    "webserver_default_route",
    "enable_chunked_context",
}


def yml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def load(text: str) -> Any:
    return YAML(typ="safe").load(text)


def migrate(text: str, **kwargs: Any) -> Migration:
    return migrate_text(yml(text), **kwargs)


def warned(result: Migration, *needles: str) -> bool:
    return any(all(n in w for n in needles) for w in result.warnings)


# --- the seven documented steps -------------------------------------------------------------------


def test_step1_inserts_inference_stack_as_first_key() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
        """
    )
    assert result.changed
    assert list(load(result.migrated)["trt_llm"]) == ["inference_stack", "build", "runtime"]
    assert result.migrated.splitlines()[1] == "  inference_stack: v2"


def test_step1_replaces_explicit_v1_in_place_and_keeps_quotes() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
          inference_stack: "v1"  # was the default
        """
    )
    assert '  inference_stack: "v2"  # was the default' in result.migrated
    assert list(load(result.migrated)["trt_llm"]) == ["build", "runtime", "inference_stack"]


def test_step2_deletes_base_model() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            base_model: decoder
            checkpoint_repository: {source: HF, repo: a/b}
        """
    )
    assert "base_model" not in result.migrated
    assert result.warnings == []


def test_step2_warns_about_non_decoder_base_model() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            base_model: encoder
            checkpoint_repository: {source: HF, repo: a/b}
        """
    )
    assert warned(result, "trt_llm.build.base_model", "encoder")


def test_step3_moves_limits_to_a_new_runtime_with_their_comments() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            # whole context window
            max_seq_len: 32768
            max_batch_size: 32  # latency first
            max_num_tokens: 8192
            quantization_type: fp8
        """
    )
    trt = load(result.migrated)["trt_llm"]
    assert trt["build"] == {
        "checkpoint_repository": {"source": "HF", "repo": "a/b"},
        "quantization_type": "fp8",
    }
    assert trt["runtime"] == {"max_seq_len": 32768, "max_batch_size": 32, "max_num_tokens": 8192}
    assert result.migrated == yml(
        """
        trt_llm:
          inference_stack: v2
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            quantization_type: fp8
          runtime:
            # whole context window
            max_seq_len: 32768
            max_batch_size: 32  # latency first
            max_num_tokens: 8192
        """
    )


def test_step3_moved_keys_go_first_in_an_existing_runtime() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            max_batch_size: 16
          runtime:
            served_model_name: my-model
        """
    )
    assert list(load(result.migrated)["trt_llm"]["runtime"]) == [
        "max_batch_size",
        "served_model_name",
    ]


def test_step3_value_already_in_runtime_wins_with_a_warning() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            max_batch_size: 16
          runtime:
            max_batch_size: 64
        """
    )
    trt = load(result.migrated)["trt_llm"]
    assert trt["runtime"]["max_batch_size"] == 64
    assert "max_batch_size" not in trt["build"]
    assert warned(result, "trt_llm.build.max_batch_size", "64", "16")


def test_step3_clamps_max_num_tokens_to_the_v2_limit() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            max_num_tokens: 262144  # v1 allowed up to 1048576
        """
    )
    assert load(result.migrated)["trt_llm"]["runtime"]["max_num_tokens"] == 131072
    assert "    max_num_tokens: 131072  # v1 allowed up to 1048576" in result.migrated
    assert warned(result, "trt_llm.runtime.max_num_tokens", "262144", "131072")


def test_step3_keeps_max_num_tokens_at_the_limit() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            max_num_tokens: 131072
        """
    )
    assert load(result.migrated)["trt_llm"]["runtime"]["max_num_tokens"] == 131072
    assert result.warnings == []


def test_step4_renames_tensor_parallel_count() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            tensor_parallel_count: 4  # one per GPU
            checkpoint_repository: {source: HF, repo: a/b}
        """
    )
    trt = load(result.migrated)["trt_llm"]
    assert "tensor_parallel_count" not in result.migrated
    assert trt["runtime"] == {"tensor_parallel_size": 4}
    assert "    tensor_parallel_size: 4  # one per GPU" in result.migrated


def test_step4_runtime_tensor_parallel_size_wins() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            tensor_parallel_count: 4
          runtime:
            tensor_parallel_size: 8
        """
    )
    assert load(result.migrated)["trt_llm"]["runtime"] == {"tensor_parallel_size": 8}
    assert warned(result, "trt_llm.build.tensor_parallel_count")


def test_step5_deletes_plugin_configuration_without_warning() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            plugin_configuration:
              paged_kv_cache: true
              use_paged_context_fmha: true
              use_fp8_context_fmha: false
            quantization_type: fp8
        """
    )
    assert "plugin_configuration" not in result.migrated
    assert "paged_kv_cache" not in result.migrated
    assert list(load(result.migrated)["trt_llm"]["build"]) == [
        "checkpoint_repository",
        "quantization_type",
    ]
    assert result.warnings == []


@pytest.mark.parametrize(
    ("speculator", "draft_len"),
    [
        # (ngram - 2) + (window - 1 + verification) * (ngram - 1)
        (
            {
                "lookahead_windows_size": 7,
                "lookahead_ngram_size": 5,
                "lookahead_verification_set_size": 3,
            },
            39,
        ),
        (
            {
                "lookahead_windows_size": 4,
                "lookahead_ngram_size": 2,
                "lookahead_verification_set_size": 2,
            },
            5,
        ),
        # capped at the v2 schema's maximum draft length (64)
        (
            {
                "lookahead_windows_size": 64,
                "lookahead_ngram_size": 64,
                "lookahead_verification_set_size": 64,
            },
            64,
        ),
        (
            {
                "num_draft_tokens": 100,
                "lookahead_windows_size": 7,
                "lookahead_ngram_size": 5,
                "lookahead_verification_set_size": 3,
            },
            64,
        ),
        # an explicit num_draft_tokens wins over the formula
        (
            {
                "num_draft_tokens": 10,
                "lookahead_windows_size": 7,
                "lookahead_ngram_size": 5,
                "lookahead_verification_set_size": 3,
            },
            10,
        ),
    ],
)
def test_step6_lookahead_becomes_ngram(speculator: dict[str, int], draft_len: int) -> None:
    fields = "\n".join(f"      {k}: {v}" for k, v in speculator.items())
    text = (
        "trt_llm:\n"
        "  build:\n"
        "    checkpoint_repository: {source: HF, repo: a/b}\n"
        "    speculator:\n"
        "      speculative_decoding_mode: LOOKAHEAD_DECODING\n"
        f"{fields}\n"
        "# after the engine\n"
        "model_name: m\n"
    )
    result = migrate_text(text)
    data = load(result.migrated)
    assert "speculator" not in data["trt_llm"]["build"]
    assert data["llm_config"] == {
        "speculative_config": {"decoding_type": "NGram", "max_draft_len": draft_len}
    }
    assert list(data) == ["trt_llm", "llm_config", "model_name"]
    # the comment that led into model_name still does
    lines = result.migrated.splitlines()
    assert lines[lines.index("model_name: m") - 1] == "# after the engine"
    assert warned(result, "trt_llm.build.speculator", "NGram", "suffix matching", str(draft_len))


def test_step6_adds_into_an_existing_llm_config() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            speculator:
              speculative_decoding_mode: LOOKAHEAD_DECODING
              lookahead_windows_size: 7
              lookahead_ngram_size: 5
              lookahead_verification_set_size: 3
        llm_config:
          b10_routing_config:
            router_temperature: 0.05  # keep
        """
    )
    llm = load(result.migrated)["llm_config"]
    assert list(llm) == ["b10_routing_config", "speculative_config"]
    assert llm["speculative_config"] == {"decoding_type": "NGram", "max_draft_len": 39}
    assert "    router_temperature: 0.05  # keep" in result.migrated


def test_step6_existing_speculative_config_is_kept() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            speculator:
              speculative_decoding_mode: LOOKAHEAD_DECODING
              num_draft_tokens: 8
        llm_config:
          speculative_config: {decoding_type: MTP, num_nextn_predict_layers: 1}
        """
    )
    assert load(result.migrated)["llm_config"]["speculative_config"]["decoding_type"] == "MTP"
    assert warned(result, "llm_config.speculative_config", "kept")


def test_step6_non_lookahead_speculator_is_removed_with_a_warning() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            speculator:
              speculative_decoding_mode: DRAFT_TOKENS_EXTERNAL
              num_draft_tokens: 4
        """
    )
    data = load(result.migrated)
    assert "speculator" not in data["trt_llm"]["build"]
    assert "llm_config" not in data
    assert warned(result, "trt_llm.build.speculator", "DRAFT_TOKENS_EXTERNAL")


@pytest.mark.parametrize("value", ["true", "false"])
def test_step7_renames_chunked_context_keeping_value_and_comment(value: str) -> None:
    result = migrate(
        f"""
        trt_llm:
          build:
            checkpoint_repository: {{source: HF, repo: a/b}}
          runtime:
            served_model_name: m
            enable_chunked_context: {value}  # chunk long prompts
        """
    )
    assert "enable_chunked_context" not in result.migrated
    assert f"    enable_chunked_prefill: {value}  # chunk long prompts" in result.migrated
    runtime = load(result.migrated)["trt_llm"]["runtime"]
    assert list(runtime) == ["served_model_name", "enable_chunked_prefill"]
    assert result.warnings == []


# --- the rest of the v1 schema --------------------------------------------------------------------


def test_v1_only_build_fields_are_deleted_and_warned_only_when_not_default() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
            max_beam_width: 1
            max_prompt_embedding_table_size: 0
            gather_all_token_logits: true
            strongly_typed: false
            pipeline_parallel_count: 2
            sequence_parallel_count: 1
            moe_expert_parallel_option: -1
            lora_adapters:
              support: {source: HF, repo: me/support-lora}
            lora_configuration: null
        """
    )
    build = load(result.migrated)["trt_llm"]["build"]
    assert list(build) == ["checkpoint_repository"]
    paths = sorted(w.split(":")[0] for w in result.warnings)
    assert paths == [
        "trt_llm.build.gather_all_token_logits",
        "trt_llm.build.lora_adapters",
        "trt_llm.build.pipeline_parallel_count",
    ]


@pytest.mark.parametrize(
    "quant",
    ["weights_int8", "weights_kv_int8", "weights_int4", "weights_int4_kv_int8", "smooth_quant"],
)
def test_legacy_quantization_stays_with_a_warning(quant: str) -> None:
    result = migrate(
        f"""
        trt_llm:
          build:
            checkpoint_repository: {{source: HF, repo: a/b}}
            quantization_type: {quant}
        """
    )
    assert load(result.migrated)["trt_llm"]["build"]["quantization_type"] == quant
    assert warned(result, "trt_llm.build.quantization_type", quant)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_cache_free_gpu_mem_fraction", "0.9"),
        ("kv_cache_host_memory_bytes", "10000000000"),
        ("batch_scheduler_policy", "max_utilization"),
        ("total_token_limit", "500000"),
        ("request_default_max_tokens", "1024"),
        ("webserver_default_route", "/v1/embeddings"),
        ("lora_cache_gpu_memory_fraction", "0.1"),
    ],
)
def test_removed_runtime_fields_leave_a_comment_in_place(field: str, value: str) -> None:
    result = migrate(
        f"""
        trt_llm:
          build:
            checkpoint_repository: {{source: HF, repo: a/b}}
          runtime:
            served_model_name: m
            {field}: {value}  # tuned last spring
            enable_chunked_context: true
        """
    )
    lines = result.migrated.splitlines()
    marker = f"    # bisllm migrate: removed {field}: {value} (no v2 equivalent)"
    assert lines[lines.index("    served_model_name: m") + 1] == marker
    assert lines[lines.index(marker) + 1] == "    enable_chunked_prefill: true"
    assert field not in load(result.migrated)["trt_llm"]["runtime"]
    assert warned(result, f"trt_llm.runtime.{field}", value)


def test_removed_first_runtime_field_keeps_the_comment_above_it() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {source: HF, repo: a/b}
          runtime:
            # memory split
            kv_cache_free_gpu_mem_fraction: 0.85
            served_model_name: m
        """
    )
    assert result.migrated.endswith(
        "  runtime:\n"
        "    # memory split\n"
        "    # bisllm migrate: removed kv_cache_free_gpu_mem_fraction: 0.85 (no v2 equivalent)\n"
        "    served_model_name: m\n"
    )


# --- autoscaling ----------------------------------------------------------------------------------

AUTOSCALING = """
trt_llm:
  build:
    checkpoint_repository: {source: HF, repo: a/b}
autoscaling_settings:
  min_replica: 1
  max_replica: 4
  concurrency_target: 32  # ~ max_batch_size / 2
  target_utilization_percentage: 70
"""


def test_concurrency_target_becomes_an_in_flight_tokens_target() -> None:
    result = migrate(AUTOSCALING)
    data = load(result.migrated)
    assert data["autoscaling_settings"] == {"min_replica": 1, "max_replica": 4}
    assert data["additional_autoscaling_config"] == {
        "metrics": [{"name": "in_flight_tokens", "target": 160000}]
    }
    assert list(data) == ["trt_llm", "autoscaling_settings", "additional_autoscaling_config"]
    assert "  # bisllm migrate: removed concurrency_target: 32" in result.migrated
    assert warned(
        result, "additional_autoscaling_config", "160000", "estimate", "autoscaler_in_flight_tokens"
    )


@pytest.mark.parametrize(("target", "tokens", "expected"), [(32, 2000, 64000), (0.3, 5000, 1500)])
def test_in_flight_tokens_target_uses_tokens_per_request(
    target: float, tokens: int, expected: int
) -> None:
    result = migrate(AUTOSCALING.replace("32  #", f"{target}  #"), tokens_per_request=tokens)
    metrics = load(result.migrated)["additional_autoscaling_config"]["metrics"]
    assert metrics == [{"name": "in_flight_tokens", "target": expected}]
    assert isinstance(metrics[0]["target"], int)


def test_existing_additional_autoscaling_config_is_kept() -> None:
    result = migrate(
        AUTOSCALING
        + "additional_autoscaling_config:\n  metrics:\n    - name: in_flight_tokens\n"
        + "      target: 40000\n"
    )
    data = load(result.migrated)
    assert data["additional_autoscaling_config"]["metrics"][0]["target"] == 40000
    assert "concurrency_target" not in data["autoscaling_settings"]
    assert warned(result, "additional_autoscaling_config", "kept")


def test_target_utilization_alone_is_removed() -> None:
    result = migrate(AUTOSCALING.replace("  concurrency_target: 32  # ~ max_batch_size / 2\n", ""))
    data = load(result.migrated)
    assert "target_utilization_percentage" not in data["autoscaling_settings"]
    assert "additional_autoscaling_config" not in data
    assert warned(result, "autoscaling_settings.target_utilization_percentage")


# --- comments, order, formatting ------------------------------------------------------------------

COMMENTED = """
# Team config, do not edit without a load test.
model_name: demo  # shown in the UI
resources:
  accelerator: H100:2
  use_gpu: true
secrets:
  hf_access_token: null
trt_llm:
  # engine settings
  build:  # compiled once
    base_model: decoder  # legacy field
    # weights from the hub
    checkpoint_repository:
      source: HF
      repo: a/b
    max_seq_len: 8192
    plugin_configuration:
      paged_kv_cache: true

    # fp8 halves memory
    quantization_type: fp8
  runtime:
    enable_chunked_context: true

# scale slowly
autoscaling_settings:
  min_replica: 1
requirements:
  - numpy
"""


def test_user_comments_and_key_order_are_preserved() -> None:
    result = migrate(COMMENTED)
    out = result.migrated
    for line in [
        "# Team config, do not edit without a load test.",
        "model_name: demo  # shown in the UI",
        "  # engine settings",
        "  build:  # compiled once",
        "    # weights from the hub",
        "    # fp8 halves memory",
        "# scale slowly",
    ]:
        assert line in out.splitlines()
    assert "# legacy field" not in out  # it was on a deleted line
    data = load(out)
    assert list(data) == [
        "model_name",
        "resources",
        "secrets",
        "trt_llm",
        "autoscaling_settings",
        "requirements",
    ]
    assert list(data["resources"]) == ["accelerator", "use_gpu"]
    assert list(data["trt_llm"]) == ["inference_stack", "build", "runtime"]
    assert list(data["trt_llm"]["build"]) == ["checkpoint_repository", "quantization_type"]
    lines = out.splitlines()
    assert lines[lines.index("    quantization_type: fp8") - 1] == "    # fp8 halves memory"
    assert lines[lines.index("autoscaling_settings:") - 1] == "# scale slowly"


def test_comments_above_a_moved_key_travel_but_those_above_a_deleted_key_stay() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            # header of build
            base_model: decoder
            # four GPUs
            tensor_parallel_count: 4
            checkpoint_repository:
              source: HF
              repo: a/b
              # inside the block

            # next is quant
            quantization_type: fp8
          runtime:
            # header of runtime
            served_model_name: m
        """
    )
    assert result.migrated == yml(
        """
        trt_llm:
          inference_stack: v2
          build:
            # header of build
            checkpoint_repository:
              source: HF
              repo: a/b
              # inside the block

            # next is quant
            quantization_type: fp8
          runtime:
            # four GPUs
            tensor_parallel_size: 4
            # header of runtime
            served_model_name: m
        """
    )


def test_flow_style_blocks_are_migrated() -> None:
    result = migrate(
        """
        trt_llm:
          build: {base_model: decoder, max_seq_len: 4096, checkpoint_repository: {repo: a/b}}
          runtime: {served_model_name: x, kv_cache_free_gpu_mem_fraction: 0.8}  # rt
        # before next
        autoscaling_settings: {min_replica: 1, concurrency_target: 4}
        """
    )
    assert result.migrated == yml(
        """
        trt_llm:
          inference_stack: v2
          build: {checkpoint_repository: {repo: a/b}}
          runtime: {max_seq_len: 4096, served_model_name: x} # rt
            # bisllm migrate: removed kv_cache_free_gpu_mem_fraction: 0.8 (no v2 equivalent)
        # before next
        autoscaling_settings: {min_replica: 1}
          # bisllm migrate: removed concurrency_target: 4 (v2 scales on in-flight tokens)
        additional_autoscaling_config:
          metrics:
            - name: in_flight_tokens
              target: 20000  # bisllm migrate: estimate; tune against autoscaler_in_flight_tokens
        """
    )


def test_flow_runtime_becomes_block_when_moved_keys_bring_comments() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            checkpoint_repository: {repo: a/b}
            # context
            max_seq_len: 4096  # long
          runtime: {served_model_name: x}  # rt
        # before next
        model_name: m
        """
    )
    assert result.migrated.endswith(
        "  runtime:  # rt\n"
        "    # context\n"
        "    max_seq_len: 4096  # long\n"
        "    served_model_name: x\n"
        "# before next\n"
        "model_name: m\n"
    )


def test_untouched_parts_are_byte_identical() -> None:
    original = yml(COMMENTED)
    out = migrate_text(original).migrated
    head = original[: original.index("trt_llm:")]
    tail = original[original.index("\n# scale slowly") :]
    assert out.startswith(head + "trt_llm:\n")
    assert out.endswith(tail)


def test_example_keeps_every_line_that_was_not_migrated() -> None:
    original = EXAMPLE.read_text()
    out_lines = set(migrate_text(original).migrated.splitlines())
    migrated_keys = (
        V1_ONLY_BUILD
        | V1_ONLY_RUNTIME
        | {
            "concurrency_target",
            "target_utilization_percentage",
            "speculative_decoding_mode",
            "lookahead_windows_size",
            "lookahead_ngram_size",
            "lookahead_verification_set_size",
            "paged_kv_cache",
            "use_paged_context_fmha",
            "use_fp8_context_fmha",
        }
    )
    for line in original.splitlines():
        if line.strip().split(":")[0] not in migrated_keys:
            assert line in out_lines, line


@pytest.mark.parametrize(
    ("text", "indent"),
    [
        # two-space maps, sequences indented under their key
        ("a:\n  b: 1\n  c:\n    - x: 1\n      y: 2\n", "  "),
        # four-space maps, sequences flush with their key
        ("a:\n    b:\n    - 1\n    - 2\n", "    "),
        # quoting, boolean and null spellings, a line longer than any wrap width
        (
            "model_name: 'q'\nflag: True\nnone: ~\nalso: null\nempty:\nlong: " + "x" * 300 + "\n",
            "  ",
        ),
        ("a: 1", "  "),  # no newline at the end of the file
    ],
)
def test_untouched_text_round_trips_byte_identically(text: str, indent: str) -> None:
    v1 = f"trt_llm:\n{indent}runtime:\n{indent * 2}served_model_name: m\n"
    v2 = (
        f"trt_llm:\n{indent}inference_stack: v2\n{indent}runtime:\n"
        f"{indent * 2}served_model_name: m\n"
    )
    assert migrate_text(v1 + text).migrated == v2 + text


V1_BLOCK = "trt_llm:\n  runtime:\n    served_model_name: m\n"
V2_BLOCK = "trt_llm:\n  inference_stack: v2\n  runtime:\n    served_model_name: m\n"


def test_explicit_document_start_and_the_comments_above_it_survive() -> None:
    head = "# above the marker\n---\n# below the marker\n"
    assert migrate_text(head + V1_BLOCK).migrated == head + V2_BLOCK


def test_crlf_line_endings_survive() -> None:
    crlf = (V1_BLOCK + "# end\n").replace("\n", "\r\n")
    assert migrate_text(crlf).migrated == (V2_BLOCK + "# end\n").replace("\n", "\r\n")


# --- no-op, idempotence, diff ---------------------------------------------------------------------


def test_v2_input_is_left_alone() -> None:
    text = yml(
        """
        trt_llm:
          inference_stack: v2
          build:
            base_model: decoder   # would be migrated if this were v1
            checkpoint_repository: {source: HF, repo: a/b}
          runtime: {}
        autoscaling_settings: {concurrency_target: 3}
        """
    )
    result = migrate_text(text)
    assert result == Migration(text, text, False, [])
    assert result.diff() == ""


@pytest.mark.parametrize("text", [COMMENTED, AUTOSCALING, "__example__"])
def test_migrating_twice_changes_nothing(text: str) -> None:
    text = EXAMPLE.read_text() if text == "__example__" else yml(text)
    once = migrate_text(text)
    twice = migrate_text(once.migrated)
    assert once.changed
    assert not twice.changed
    assert twice.migrated == once.migrated
    assert twice.warnings == []


def test_diff_is_a_unified_diff() -> None:
    result = migrate(
        """
        trt_llm:
          build:
            base_model: decoder
            checkpoint_repository: {source: HF, repo: a/b}
          runtime: {}
        """
    )
    diff = result.diff("old.yaml", "new.yaml")
    assert diff.startswith("--- old.yaml\n+++ new.yaml\n@@ ")
    assert "\n+  inference_stack: v2\n" in diff
    assert "\n-    base_model: decoder\n" in diff


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trt_llm:\n  build: [1, 2\n", "line 3, column 1"),
        ("trt_llm:\n  build: {}\n  build: {}\n", "line 3, column 3"),
        ("model_name: x\n  bad: indent\n", "not valid YAML"),
        ("- trt_llm\n", "mapping at the top level"),
        ("", "mapping at the top level"),
        ("just a string\n", "mapping at the top level"),
        ("model_name: x\n", "no trt_llm block"),
        ("trt_llm: 3\n", "trt_llm must be a mapping"),
        ("trt_llm:\n  inference_stack: v3\n", "v3; expected v1 or v2"),
        ("trt_llm:\n  inference_stack: 2\n", "2; expected v1 or v2"),
    ],
)
def test_migration_errors(text: str, message: str) -> None:
    with pytest.raises(MigrationError, match=message.replace("(", r"\(")):
        migrate_text(text)


def test_tokens_per_request_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tokens_per_request"):
        migrate_text(yml(AUTOSCALING), tokens_per_request=0)


# --- the shipped example --------------------------------------------------------------------------


def test_example_migrates_to_a_v2_shaped_config() -> None:
    result = migrate_text(EXAMPLE.read_text())
    data = load(result.migrated)
    trt = data["trt_llm"]
    assert next(iter(trt)) == "inference_stack"
    assert trt["inference_stack"] == "v2"
    assert not set(trt["build"]) & V1_ONLY_BUILD
    assert not set(trt["runtime"]) & V1_ONLY_RUNTIME
    assert trt["runtime"] == {
        "max_seq_len": 131072,
        "max_batch_size": 64,
        "max_num_tokens": 16384,
        "tensor_parallel_size": 2,
        "enable_chunked_prefill": True,
        "served_model_name": "llama-3.3-70b-instruct",
    }
    assert data["llm_config"]["speculative_config"] == {
        "decoding_type": "NGram",
        "max_draft_len": 39,
    }
    assert "concurrency_target" not in data["autoscaling_settings"]
    assert "target_utilization_percentage" not in data["autoscaling_settings"]
    assert data["additional_autoscaling_config"]["metrics"] == [
        {"name": "in_flight_tokens", "target": 160000}
    ]
    assert data["secrets"] == {"hf_access_token": None}
    assert "  hf_access_token: null\n" in result.migrated


def test_migrated_example_validates_as_v2() -> None:
    from bisllm_truss.validate import validate_text  # written alongside; imported lazily

    result = validate_text(migrate_text(EXAMPLE.read_text()).migrated, filename="config.yaml")
    assert result.ok, "\n".join(str(issue) for issue in result.issues)
