"""Published flagship config.json values build our model classes on the `meta` device (no
memory) with the published total and active parameter counts.

The configs below are written from the values the model repositories publish (see
shared/reference/model-families.md, sections 6 and 9). Totals must equal transformers' own
meta-device count of the same config exactly, and round to the published sizes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bisllm_server.engine.layers.moe import SparseMoE
from bisllm_server.engine.models import resolve_architecture
from bisllm_server.engine.models.config import DecoderConfig

QWEN3_30B_A3B: dict[str, Any] = dict(
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

GLM_4_5: dict[str, Any] = dict(
    architectures=["Glm4MoeForCausalLM"],
    model_type="glm4_moe",
    vocab_size=151552,
    hidden_size=5120,
    intermediate_size=12288,
    moe_intermediate_size=1536,
    num_hidden_layers=92,
    num_attention_heads=96,
    num_key_value_heads=8,
    head_dim=128,
    n_routed_experts=160,
    n_shared_experts=1,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    use_qk_norm=True,
    attention_bias=True,
    partial_rotary_factor=0.5,
    max_position_embeddings=131072,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
)

# GLM-4.6 and GLM-4.7 keep GLM-4.5's shape and extend the context.
GLM_4_7: dict[str, Any] = dict(GLM_4_5, max_position_embeddings=202752)

GLM_4_5_AIR: dict[str, Any] = dict(
    GLM_4_5,
    hidden_size=4096,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=46,
    n_routed_experts=128,
    first_k_dense_replace=1,
    routed_scaling_factor=1.0,
    use_qk_norm=False,
)

# DeepSeek-V3 / R1 / V3.1 share this config.json (V3.1 only adds chat-template modes).
DEEPSEEK_V3_1: dict[str, Any] = dict(
    architectures=["DeepseekV3ForCausalLM"],
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    routed_scaling_factor=2.5,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    max_position_embeddings=163840,
    rope_theta=10000,
    rope_scaling=dict(
        type="yarn",
        factor=40,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
    quantization_config=dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128]
    ),
)

# Kimi-K2-Instruct-0905: DeepSeek-V3's architecture under its own model_type.
KIMI_K2: dict[str, Any] = dict(
    DEEPSEEK_V3_1,
    model_type="kimi_k2",
    vocab_size=163840,
    num_attention_heads=64,
    num_key_value_heads=64,
    n_routed_experts=384,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.827,
    rope_theta=50000.0,
    rope_scaling=dict(
        type="yarn",
        factor=64.0,
        original_max_position_embeddings=4096,
        beta_fast=1.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
    max_position_embeddings=262144,
    num_nextn_predict_layers=0,
)

GPT_OSS_120B: dict[str, Any] = dict(
    architectures=["GptOssForCausalLM"],
    model_type="gpt_oss",
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=36,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=128,
    num_experts_per_tok=4,
    experts_per_token=4,
    attention_bias=True,
    sliding_window=128,
    layer_types=["sliding_attention", "full_attention"] * 18,
    swiglu_limit=7.0,
    initial_context_length=4096,
    max_position_embeddings=131072,
    rope_theta=150000,
    rope_scaling=dict(
        rope_type="yarn",
        factor=32.0,
        beta_fast=32.0,
        beta_slow=1.0,
        original_max_position_embeddings=4096,
        truncate=False,
    ),
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    eos_token_id=200002,
    pad_token_id=199999,
    quantization_config=dict(
        quant_method="mxfp4",
        modules_to_not_convert=[
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    ),
)

GPT_OSS_20B: dict[str, Any] = dict(
    GPT_OSS_120B,
    num_hidden_layers=24,
    num_local_experts=32,
    layer_types=["sliding_attention", "full_attention"] * 12,
)

# The hub repo's config.json is the multimodal one; the engine reads its `text_config`.
LLAMA_4_MAVERICK: dict[str, Any] = dict(
    architectures=["Llama4ForConditionalGeneration"],
    model_type="llama4",
    text_config=dict(
        model_type="llama4_text",
        vocab_size=202048,
        hidden_size=5120,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        num_local_experts=128,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        use_qk_norm=False,
        attention_chunk_size=8192,
        attn_temperature_tuning=True,
        floor_scale=8192,
        attn_scale=0.1,
        max_position_embeddings=1048576,
        rope_theta=500000.0,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        bos_token_id=200000,
        eos_token_id=[200001, 200007, 200008],
        pad_token_id=200018,
        tie_word_embeddings=False,
    ),
    tie_word_embeddings=False,
)

LLAMA_4_SCOUT: dict[str, Any] = dict(
    LLAMA_4_MAVERICK,
    text_config=dict(
        LLAMA_4_MAVERICK["text_config"],
        num_local_experts=16,
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        max_position_embeddings=10485760,
        rope_scaling=dict(
            rope_type="llama3",
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=8192,
        ),
    ),
)


def counts(hf_config: dict[str, Any]) -> tuple[int, int, int, DecoderConfig]:
    """(total, active, embedding + head) parameters without the MTP layers, and the parsed
    config. Active: everything but the experts a token's router leaves out (k of E run)."""
    _, cls = resolve_architecture(hf_config)
    with torch.device("meta"):
        model = cls(hf_config)
    cfg = model.config
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    idle = 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, SparseMoE):
            experts = sum(p.numel() for p in layer.mlp.experts.parameters())
            idle += experts * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return total, total - idle, embeddings, cfg


def transformers_count(hf_config: dict[str, Any]) -> int:
    """transformers' own meta-device count, routing-bias buffers included (ours are
    parameters, loaded like any weight)."""
    import transformers

    config_cls = {
        "qwen3_moe": "Qwen3MoeConfig",
        "glm4_moe": "Glm4MoeConfig",
        "deepseek_v3": "DeepseekV3Config",
        "kimi_k2": "DeepseekV3Config",  # transformers has no kimi_k2; K2 is this architecture
        "gpt_oss": "GptOssConfig",
        "llama4_text": "Llama4TextConfig",
    }
    hf_config = hf_config.get("text_config") or hf_config  # Llama 4: the text model
    skipped = ("architectures", "model_type", "quantization_config")
    kwargs = {k: v for k, v in hf_config.items() if k not in skipped}
    config = getattr(transformers, config_cls[hf_config["model_type"]])(**kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    biases = sum(b.numel() for n, b in model.named_buffers() if "e_score_correction" in n)
    return sum(p.numel() for p in model.parameters()) + biases


# Published sizes, in billions: total, and active per token. Qwen counts the embedding and the
# head as active (3.3B of 30.5B); Zhipu does not (32B of 355B, 12B of 106B), so for GLM the
# active figure is compared without them. DeepSeek's 37B and Moonshot's 32B active include
# them; their totals exclude the MTP layer (671B; the hub's "685B" adds it). OpenAI counts the
# head but not the embedding (5.1B of 117B, 3.6B of 21B). Meta's 17B active includes both;
# its totals (400B, 109B) include a vision tower of under 1B that the text model leaves out.
@pytest.mark.parametrize(
    ("config", "total", "active", "active_counts"),
    [
        (QWEN3_30B_A3B, 30.5, 3.3, "both"),
        (GLM_4_5, 355, 32, "none"),
        (GLM_4_5_AIR, 106, 12, "none"),
        (GLM_4_7, 355, 32, "none"),
        (DEEPSEEK_V3_1, 671, 37, "both"),
        (KIMI_K2, 1026, 32, "both"),
        (GPT_OSS_120B, 117, 5.1, "head"),
        (GPT_OSS_20B, 21, 3.6, "head"),
        (LLAMA_4_MAVERICK, 400, 17, "both"),
        (LLAMA_4_SCOUT, 109, 17, "both"),
    ],
    ids=[
        "Qwen3-30B-A3B",
        "GLM-4.5",
        "GLM-4.5-Air",
        "GLM-4.7",
        "DeepSeek-V3.1",
        "Kimi-K2",
        "GPT-OSS-120B",
        "GPT-OSS-20B",
        "Llama-4-Maverick",
        "Llama-4-Scout",
    ],
)
def test_flagship_parameter_counts(config, total, active, active_counts):
    got_total, got_active, embeddings, _ = counts(config)
    assert got_total == transformers_count(config)
    assert got_total / 1e9 == pytest.approx(total, rel=0.015)
    if config.get("num_nextn_predict_layers"):
        # The MTP layer: one more MoE decoder layer, eh_proj [H, 2H] and three norms.
        with torch.device("meta"):
            model = resolve_architecture(config)[1](config)
        assert model.mtp is not None
        hidden = model.config.hidden_size
        block = sum(p.numel() for p in model.model.layers[-1].parameters())
        mtp = sum(p.numel() for p in model.mtp.parameters())
        assert mtp == block + 2 * hidden * hidden + 3 * hidden
    if active_counts != "both":
        got_active -= embeddings // (2 if active_counts == "head" else 1)
    assert got_active / 1e9 == pytest.approx(active, rel=0.03)


def test_glm_config_parsing():
    *_, cfg = counts(GLM_4_5)
    assert cfg.moe_layers == frozenset(range(3, 92))  # three dense layers first
    assert cfg.router == "sigmoid_grouped" and cfg.routed_scaling_factor == 2.5
    assert cfg.shared_expert_intermediate_size == 1536
    assert cfg.qkv_bias and not cfg.o_bias and cfg.qk_norm
    assert cfg.rope["partial_rotary_factor"] == 0.5
    *_, air = counts({k: v for k, v in GLM_4_5_AIR.items() if k != "partial_rotary_factor"})
    assert not air.qk_norm and air.moe_layers == frozenset(range(1, 46))
    assert air.rope["partial_rotary_factor"] == 0.5  # transformers' default when absent


def test_expert_groups_must_divide_the_experts():
    with pytest.raises(
        ValueError, match=r"n_routed_experts \(160\) must be a multiple of n_group \(3\)"
    ):
        counts(dict(GLM_4_5, n_group=3, topk_group=1))


def test_deepseek_config_parsing():
    *_, cfg = counts(DEEPSEEK_V3_1)
    assert cfg.attention == "mla" and cfg.q_lora_rank == 1536 and cfg.rope_interleave
    assert cfg.head_dim == 192 and cfg.num_kv_heads == cfg.num_heads == 128
    assert cfg.moe_layers == frozenset(range(3, 61))
    assert (cfg.n_group, cfg.topk_group, cfg.top_k) == (8, 4, 8)
    # yarn factor 40 with mscale_all_dim 1: softmax scale x (0.1 ln 40 + 1)^2.
    assert cfg.attn_scale_factor == pytest.approx(1.8739, abs=1e-4)
    assert cfg.rope["rope_type"] == "yarn" and cfg.rope["factor"] == 40
    *_, kimi = counts(KIMI_K2)
    assert kimi.moe_layers == frozenset(range(1, 61)) and kimi.n_group == 1
    assert kimi.routed_scaling_factor == pytest.approx(2.827)
    assert kimi.num_mtp_layers == 0


def test_gpt_oss_config_parsing():
    *_, cfg = counts(GPT_OSS_120B)
    assert cfg.layer_types[:4] == ("sliding_attention", "full_attention") * 2
    assert cfg.sliding_window == 128 and cfg.attention_sinks
    assert cfg.qkv_bias and cfg.o_bias and cfg.router_bias and cfg.expert_bias
    assert (cfg.router, cfg.top_k, cfg.num_experts) == ("topk_softmax", 4, 128)
    assert (cfg.expert_activation, cfg.swiglu_limit) == ("clamped_swiglu", 7.0)
    assert cfg.moe_layers == frozenset(range(36)) and cfg.norm_fp32_scale
    assert cfg.rope["rope_type"] == "yarn" and cfg.rope["truncate"] is False
    # Without RoPE keys, transformers' GptOssConfig default applies (yarn 32, no truncation).
    bare = {k: v for k, v in GPT_OSS_20B.items() if k not in ("rope_scaling", "layer_types")}
    *_, default = counts(bare)
    assert default.rope["factor"] == 32.0 and default.rope["truncate"] is False
    assert default.layer_types == ("sliding_attention", "full_attention") * 12


def test_llama4_config_parsing():
    *_, maverick = counts(LLAMA_4_MAVERICK)
    assert maverick.moe_layers == frozenset(range(1, 48, 2))  # odd layers MoE
    assert maverick.intermediate_size == 16384 and maverick.moe_intermediate_size == 8192
    assert maverick.shared_expert_intermediate_size == 8192
    assert maverick.nope_layers == frozenset(range(3, 48, 4))  # every 4th layer
    assert maverick.layer_type(0) == "chunked_attention" and maverick.layer_type(3) == (
        "full_attention"
    )
    assert maverick.attention_chunk_size == 8192 and maverick.rope_interleave
    assert not maverick.qk_l2_norm and maverick.attn_temperature_tuning
    assert maverick.router == "sigmoid_topk_input" and maverick.top_k == 1
    assert maverick.rope["rope_type"] == "default" and maverick.rope["rope_theta"] == 500000.0
    *_, scout = counts(LLAMA_4_SCOUT)
    assert scout.moe_layers == frozenset(range(48)) and scout.qk_l2_norm
    assert scout.rope["rope_type"] == "llama3" and scout.rope["factor"] == 16.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(GPT_OSS_20B, layer_types=["sliding_attention"] * 3), "layer_types must list 24"),
        (
            dict(GPT_OSS_20B, layer_types=["local"] * 24),
            "entries of sliding_attention / full_attention",
        ),
        (
            dict(LLAMA_4_SCOUT, text_config=dict(LLAMA_4_SCOUT["text_config"], no_rope_layers=[1])),
            "no_rope_layers lists 1 layers, the model has 48",
        ),
    ],
    ids=["gpt_oss_short_layer_types", "gpt_oss_unknown_layer_type", "llama4_short_no_rope"],
)
def test_bad_layer_lists_are_named(config, message):
    from bisllm_server.engine.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=message):
        counts(config)
