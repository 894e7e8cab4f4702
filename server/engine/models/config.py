"""The normalised description of a decoder-only model, parsed from a HF config.json dict.

Families read their own keys (and transformers' class defaults for keys a hub config may omit)
and fill one `DecoderConfig`; the shared decoder is built from that alone, so the engine never
needs transformers' config classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bisllm_server.engine.layers.rotary import rope_parameters


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture, or one of its features, is not implemented."""


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP layers
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any]
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # Weightless RMS normalisation of q and k after RoPE, on RoPE layers only (Llama 4).
    qk_l2_norm: bool = False
    # RMSNorm scales the fp32 normalised value by an fp32 weight and rounds once (GPT-OSS,
    # whose norms transformers keeps in fp32); otherwise the weight scales the rounded value.
    norm_fp32_scale: bool = False
    # Per-layer attention kind: "full_attention", "sliding_attention" (each query sees itself
    # and the `sliding_window` - 1 tokens before it) or "chunked_attention" (keys in the
    # query's own block of `attention_chunk_size` positions). Empty: every layer is full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    # One learned logit per head added to every softmax denominator (GPT-OSS).
    attention_sinks: bool = False
    nope_layers: frozenset[int] = field(default_factory=frozenset)  # layers without RoPE
    # Llama 4 NoPE layers: queries at position p scaled by
    # 1 + attn_scale * ln(1 + floor((p + 1) / floor_scale)).
    attn_temperature_tuning: bool = False
    attn_scale: float = 0.1
    floor_scale: float = 8192.0
    # Mixture of experts; empty `moe_layers` means a dense model.
    moe_layers: frozenset[int] = field(default_factory=frozenset)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    renormalize: bool = True  # renormalise the top-k router weights to sum to one
    # "softmax": softmax over experts, then top-k (Qwen3-MoE, Mixtral). "sigmoid_grouped":
    # DeepSeek-V3 / GLM-4.5 scoring: sigmoid scores, a per-expert correction bias used for the
    # choice only, top-k within the `topk_group` best of `n_group` expert groups, weights
    # scaled by `routed_scaling_factor`. "topk_softmax": softmax over the top-k logits
    # (GPT-OSS). "sigmoid_topk_input": sigmoid of the top-k logits, scaling the expert's
    # input (Llama 4). See layers/moe.py.
    router: str = "softmax"
    router_bias: bool = False
    expert_bias: bool = False
    # Experts' activation: "silu" (silu(gate) * up) or "clamped_swiglu" (GPT-OSS, with
    # `swiglu_alpha` and `swiglu_limit`).
    expert_activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Whether the top-k routing weights stay fp32 when they scale the experts' outputs, as in
    # transformers' Mixtral, GLM-4.5 and DeepSeek-V3 (each product is rounded to the model
    # dtype once); Qwen3-MoE rounds the weights to the model dtype first. In bf16 the two
    # differ by a rounding per layer, which is visible in the logprobs.
    fp32_routing_weights: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # Always-on shared expert next to the routed ones (DeepSeek, GLM); 0 = none.
    shared_expert_intermediate_size: int = 0
    # Multi-token-prediction (NextN) layers stored after the decoder layers (DeepSeek-V3, GLM):
    # loaded when the checkpoint has them and kept for speculative decoding.
    num_mtp_layers: int = 0
    # Attention: "mha" (multi-/grouped-query attention over per-head K and V) or "mla"
    # (DeepSeek's multi-head latent attention, below; `head_dim` is then the query/key head
    # dim, qk_nope_head_dim + qk_rope_head_dim, and `num_kv_heads` equals `num_heads`).
    attention: str = "mha"
    q_lora_rank: int | None = None  # None: one q_proj instead of q_a_proj / q_b_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs are adjacent elements (DeepSeek's layout)
    attn_scale_factor: float = 1.0  # times head_dim ** -0.5 (yarn's mscale² for DeepSeek)

    def layer_type(self, layer_id: int) -> str:
        return self.layer_types[layer_id] if self.layer_types else "full_attention"

    @property
    def rope_head_dim(self) -> int:
        """The width the rotary table covers before `partial_rotary_factor`."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def kv_cache_layout(self) -> tuple[int, int, int, bool]:
        """(KV heads, K width, V width, V shares K's storage) per token and layer in the
        cache. MLA caches one shared "head": the latent then the rotary key; V is the latent."""
        if self.attention == "mla":
            return 1, self.kv_lora_rank + self.qk_rope_head_dim, self.kv_lora_rank, True
        return self.num_kv_heads, self.head_dim, self.head_dim, False


def checked_layer_types(
    layer_types: Iterable[str], num_layers: int, allowed: tuple[str, ...]
) -> tuple[str, ...]:
    """`layer_types` as a tuple, if it names one of `allowed` for each of the layers."""
    types = tuple(layer_types)
    if len(types) != num_layers or not set(types) <= set(allowed):
        raise UnsupportedModelError(
            f"layer_types must list {num_layers} entries of {' / '.join(allowed)}, "
            f"got {list(types)}"
        )
    return types


def require(hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}")
    return hf[key]


def common_fields(
    hf: dict[str, Any], *, default_theta: float, default_eps: float, default_max_positions: int
) -> dict[str, Any]:
    """The DecoderConfig fields every supported family spells the same way."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
    hidden, heads = require(hf, "hidden_size"), require(hf, "num_attention_heads")
    max_positions = hf.get("max_position_embeddings") or default_max_positions
    return dict(
        vocab_size=require(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=require(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        # Explicit head_dim may differ from hidden / heads (Qwen3-MoE: 128 vs 64 on 30B-A3B).
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf.get("intermediate_size") or 0,
        rms_norm_eps=float(hf.get("rms_norm_eps", default_eps)),
        max_position_embeddings=max_positions,
        rope=rope_parameters({**hf, "max_position_embeddings": max_positions}, default_theta),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def grouped_moe_fields(
    hf: dict[str, Any],
    num_layers: int,
    *,
    default_experts: int,
    default_first_dense: int,
    default_moe_intermediate: int,
    default_scaling: float,
) -> dict[str, Any]:
    """The DecoderConfig fields of DeepSeek-V3-style MoE (DeepSeek, Kimi-K2, GLM-4.5): sigmoid
    scores with a correction bias, group-limited top-k, scaled fp32 weights, a shared expert,
    `first_k_dense_replace` dense layers first, and MTP layers. The defaults are the family's
    transformers class defaults, for keys a config.json omits."""
    num_experts = hf.get("n_routed_experts") or hf.get("num_local_experts") or default_experts
    first_dense = hf.get("first_k_dense_replace", default_first_dense)
    moe_intermediate = hf.get("moe_intermediate_size") or default_moe_intermediate
    return dict(
        moe_layers=frozenset(range(first_dense, num_layers)),
        num_experts=num_experts,
        top_k=hf.get("num_experts_per_tok") or 8,
        moe_intermediate_size=moe_intermediate,
        renormalize=bool(hf.get("norm_topk_prob", True)),
        router="sigmoid_grouped",
        fp32_routing_weights=True,
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", default_scaling)),
        shared_expert_intermediate_size=moe_intermediate * hf.get("n_shared_experts", 1),
        num_mtp_layers=hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0,
    )
