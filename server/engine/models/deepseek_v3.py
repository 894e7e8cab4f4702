"""DeepSeek-V3 / V3.1 / R1 and Kimi-K2 (`deepseek_v3`; Kimi's `kimi_k2` config is the same
architecture under another model_type).

- Attention: multi-head latent attention over a compressed cache (models/mla.py), optional
  q LoRA (`q_lora_rank`), RoPE on qk_rope_head_dim dims in DeepSeek's interleaved layout
  (`rope_interleave`, default true), yarn scaling whose mscale² multiplies the softmax scale
  when `mscale_all_dim` is set.
- MoE: sigmoid scores with `e_score_correction_bias`, group-limited top-k (`n_group`,
  `topk_group`), `norm_topk_prob`, `routed_scaling_factor`, `n_shared_experts` always-on
  experts; the first `first_k_dense_replace` layers are dense MLPs of `intermediate_size`.
- `num_nextn_predict_layers` MTP layers (`model.layers.{num_hidden_layers + i}.*`) are loaded
  when present, like GLM's (decoder.MtpLayer).

Absent keys take transformers' DeepseekV3Config defaults, which are the flagship's shape.
"""

from __future__ import annotations

import math
from typing import Any

from bisllm_server.engine.models.config import DecoderConfig, common_fields, grouped_moe_fields
from bisllm_server.engine.models.decoder import DecoderForCausalLM


def yarn_softmax_scale_factor(rope: dict[str, Any]) -> float:
    """mscale² with mscale = 0.1 · mscale_all_dim · ln(factor) + 1, for non-default rope types
    with a non-zero `mscale_all_dim` (DeepSeek-V3: factor 40 gives ≈ 1.874); else 1."""
    mscale_all_dim = rope.get("mscale_all_dim") or 0
    factor = rope.get("factor") or 1.0
    if rope.get("rope_type", "default") == "default" or not mscale_all_dim or factor <= 1:
        return 1.0
    mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
    return mscale * mscale


class DeepseekV3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        hf = hf_config
        fields = common_fields(
            hf, default_theta=10_000.0, default_eps=1e-6, default_max_positions=4096
        )
        nope, rope_dim = hf.get("qk_nope_head_dim", 128), hf.get("qk_rope_head_dim", 64)
        heads = fields["num_heads"]
        # MLA has no grouped K/V heads: every query head reads the one shared latent.
        fields.update(num_kv_heads=heads, head_dim=nope + rope_dim)
        return DecoderConfig(
            **fields,
            **grouped_moe_fields(
                hf,
                fields["num_layers"],
                default_experts=256,
                default_first_dense=3,
                default_moe_intermediate=2048,
                default_scaling=2.5,
            ),
            qkv_bias=bool(hf.get("attention_bias", False)),
            attention="mla",
            # A key present as null means "no q LoRA"; an absent one takes the class default.
            q_lora_rank=hf.get("q_lora_rank", 1536),
            kv_lora_rank=hf.get("kv_lora_rank", 512),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope_dim,
            v_head_dim=hf.get("v_head_dim", 128),
            rope_interleave=bool(hf.get("rope_interleave", True)),
            attn_scale_factor=yarn_softmax_scale_factor(fields["rope"]),
        )
