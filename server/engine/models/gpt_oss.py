"""GPT-OSS (`gpt_oss`: gpt-oss-20b, gpt-oss-120b).

- Attention: GQA with biases on q, k, v and o; one learned sink logit per head
  (`self_attn.sinks`); `layer_types` alternating "sliding_attention" (window `sliding_window`,
  128) and "full_attention", sliding first; yarn RoPE (half-split layout) whose `truncate`
  defaults to false here, unlike DeepSeek.
- MoE on every layer: a router with a bias, softmax over the top-k logits; experts with
  biases and a clamped SwiGLU, (up + 1) * gate * sigmoid(1.702 gate), gate <= 7, |up| <= 7.
- Norms scale in fp32 (transformers keeps them in fp32).

The hub stores the experts fused and transposed relative to this engine, with gate and up
interleaved along the last axis: `experts.gate_up_proj` [E, H, 2I] (even columns gate, odd
columns up), `experts.gate_up_proj_bias` [E, 2I], `experts.down_proj` [E, I, H],
`experts.down_proj_bias` [E, H]; the official checkpoints keep the two weights in MXFP4
(blocks + scales), which the loader dequantizes into that same layout first (mxfp4.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from bisllm_server.engine.models.config import DecoderConfig, checked_layer_types, common_fields
from bisllm_server.engine.models.decoder import DecoderForCausalLM

# transformers' GptOssConfig default when a config.json names no RoPE parameters.
DEFAULT_ROPE = dict(
    rope_type="yarn",
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)
LAYER_TYPES = ("sliding_attention", "full_attention")


def deinterleave_last(t: torch.Tensor) -> torch.Tensor:
    """[..., 2I] with gate at even and up at odd positions -> [..., gate | up]."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


class GptOssForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"\.mlp\.router\.", ".mlp.gate."),
    )

    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        hf = dict(hf_config)
        if not (hf.get("rope_scaling") or hf.get("rope_parameters")):
            hf["rope_parameters"] = DEFAULT_ROPE
        fields = common_fields(
            hf, default_theta=150_000.0, default_eps=1e-5, default_max_positions=131072
        )
        num_layers = fields["num_layers"]
        layer_types = checked_layer_types(
            hf.get("layer_types") or (LAYER_TYPES[i % 2] for i in range(num_layers)),
            num_layers,
            LAYER_TYPES,
        )
        bias = bool(hf.get("attention_bias", True))
        return DecoderConfig(
            **fields,
            qkv_bias=bias,
            o_bias=bias,
            norm_fp32_scale=True,
            layer_types=layer_types,
            sliding_window=hf.get("sliding_window", 128),  # null: "sliding" layers see all
            attention_sinks=True,
            moe_layers=frozenset(range(num_layers)),
            num_experts=hf.get("num_local_experts") or hf.get("num_experts") or 128,
            top_k=hf.get("num_experts_per_tok") or 4,
            moe_intermediate_size=hf.get("intermediate_size") or 2880,
            router="topk_softmax",
            router_bias=True,
            expert_bias=True,
            expert_activation="clamped_swiglu",
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        )

    def convert_checkpoint_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.endswith(".experts.gate_up_proj"):
                # [E, H, 2I] interleaved -> [E, 2I, H] with the gate rows first.
                yield name, deinterleave_last(tensor).transpose(1, 2)
            elif name.endswith(".experts.down_proj"):
                yield name, tensor.transpose(1, 2)  # [E, I, H] -> [E, H, I]
            elif name.endswith(".experts.gate_up_proj_bias"):
                yield name.removesuffix("gate_up_proj_bias") + "b13", deinterleave_last(tensor)
            elif name.endswith(".experts.down_proj_bias"):
                yield name.removesuffix("down_proj_bias") + "b2", tensor
            else:
                yield name, tensor
