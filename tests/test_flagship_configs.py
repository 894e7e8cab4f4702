"""Published flagship config.json values build our model classes on the `meta` device (no
memory) with the published total and active parameter counts.

The configs below are written from the values the model repositories publish (see
shared/reference/model-families.md, sections 6 and 9). Totals must equal transformers' own
meta-device count of the same config exactly, and round to the published sizes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

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


def counts(hf_config: dict[str, Any]) -> tuple[int, int, int, DecoderConfig]:
    """(total, active, embedding + head) parameters without the MTP layers, and the parsed
    config."""
    _, cls = resolve_architecture(hf_config)
    with torch.device("meta"):
        model = cls(hf_config)
    cfg = model.config
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    idle = (cfg.num_experts - cfg.top_k) * per_expert * len(cfg.moe_layers)
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
    }
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
# them; their totals exclude the MTP layer (671B; the hub's "685B" adds it).
@pytest.mark.parametrize(
    ("config", "total", "active", "active_counts_embeddings"),
    [
        (QWEN3_30B_A3B, 30.5, 3.3, True),
        (GLM_4_5, 355, 32, False),
        (GLM_4_5_AIR, 106, 12, False),
        (GLM_4_7, 355, 32, False),
        (DEEPSEEK_V3_1, 671, 37, True),
        (KIMI_K2, 1026, 32, True),
    ],
    ids=["Qwen3-30B-A3B", "GLM-4.5", "GLM-4.5-Air", "GLM-4.7", "DeepSeek-V3.1", "Kimi-K2"],
)
def test_flagship_parameter_counts(config, total, active, active_counts_embeddings):
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
    if not active_counts_embeddings:
        got_active -= embeddings
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
