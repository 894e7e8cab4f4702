"""Llama (dense, GQA): Llama 2/3/3.1/3.3 and look-alikes with optional attention/MLP biases."""

from __future__ import annotations

from typing import Any

from bisllm_server.engine.models.config import DecoderConfig, common_fields
from bisllm_server.engine.models.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        bias = bool(hf_config.get("attention_bias", False))
        return DecoderConfig(
            **common_fields(
                hf_config, default_theta=10_000.0, default_eps=1e-6, default_max_positions=2048
            ),
            qkv_bias=bias,
            o_bias=bias,  # Llama's attention_bias covers o_proj too
            mlp_bias=bool(hf_config.get("mlp_bias", False)),
        )
