"""Qwen3-MoE: per-head QK RMSNorm before RoPE, explicit head_dim, softmax top-k routing.

A layer is MoE unless it is listed in `mlp_only_layers` or skipped by `decoder_sparse_step`
(MoE iff (index + 1) % step == 0); the rest use a dense MLP of `intermediate_size`.
"""

from __future__ import annotations

from typing import Any

from bisllm_server.engine.models.config import DecoderConfig, UnsupportedModelError, common_fields
from bisllm_server.engine.models.decoder import DecoderForCausalLM


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        if hf_config.get("use_sliding_window") and hf_config.get("sliding_window"):
            raise UnsupportedModelError("Qwen3-MoE with use_sliding_window is not supported")
        fields = common_fields(
            hf_config, default_theta=10_000.0, default_eps=1e-6, default_max_positions=32768
        )
        # transformers saves the expert count as num_local_experts; hub configs say num_experts.
        num_experts = hf_config.get("num_experts") or hf_config.get("num_local_experts") or 128
        step = hf_config.get("decoder_sparse_step") or 1
        dense_only = set(hf_config.get("mlp_only_layers") or [])
        moe_layers = frozenset(
            i for i in range(fields["num_layers"]) if i not in dense_only and (i + 1) % step == 0
        )
        bias = bool(hf_config.get("attention_bias", False))
        return DecoderConfig(
            **fields,
            qkv_bias=bias,
            o_bias=bias,
            qk_norm=True,
            moe_layers=moe_layers,
            num_experts=num_experts,
            top_k=hf_config.get("num_experts_per_tok") or 8,
            moe_intermediate_size=hf_config.get("moe_intermediate_size") or 768,
            # The class default is False; released checkpoints set it to true.
            renormalize=bool(hf_config.get("norm_topk_prob", False)),
            # NextN layers in DeepSeek's layout (model.layers.{num_layers + i}.*), as the
            # embedded model's trained MTP layer is stored; transformers' class has none.
            num_mtp_layers=hf_config.get("num_nextn_predict_layers") or 0,
        )
