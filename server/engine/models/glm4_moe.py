"""GLM-4.5 / 4.6 / 4.7 (`glm4_moe`): DeepSeek-V3-style MoE under a GQA decoder.

- Attention: biases on q/k/v only (`attention_bias`; o_proj never has one), optional per-head
  QK RMSNorm (`use_qk_norm`), RoPE on the first `partial_rotary_factor` of each head (0.5 when
  the config omits it, as transformers assumes).
- MoE: sigmoid scores with `e_score_correction_bias`, group-limited top-k (`n_group`,
  `topk_group`), `norm_topk_prob`, `routed_scaling_factor`, plus `n_shared_experts` always-on
  experts fused into one SwiGLU of `moe_intermediate_size * n_shared_experts`.
- The first `first_k_dense_replace` layers are dense MLPs of `intermediate_size`.
- `num_nextn_predict_layers` MTP layers, stored as the layers after the last one, are loaded
  when the checkpoint has them (see decoder.MtpLayer).
"""

from __future__ import annotations

from typing import Any

from bisllm_server.engine.models.config import DecoderConfig, common_fields
from bisllm_server.engine.models.decoder import DecoderForCausalLM


class Glm4MoeForCausalLM(DecoderForCausalLM):
    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        hf = dict(hf_config)
        if hf.get("partial_rotary_factor") is None:
            hf["partial_rotary_factor"] = 0.5  # a value inside rope_parameters still wins
        fields = common_fields(
            hf, default_theta=10_000.0, default_eps=1e-5, default_max_positions=131072
        )
        num_experts = hf.get("n_routed_experts") or hf.get("num_local_experts") or 128
        first_dense = hf.get("first_k_dense_replace", 1)
        moe_intermediate = hf.get("moe_intermediate_size") or 1408
        return DecoderConfig(
            **fields,
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=False,
            qk_norm=bool(hf.get("use_qk_norm", False)),
            moe_layers=frozenset(range(first_dense, fields["num_layers"])),
            num_experts=num_experts,
            top_k=hf.get("num_experts_per_tok") or 8,
            moe_intermediate_size=moe_intermediate,
            renormalize=bool(hf.get("norm_topk_prob", True)),
            router="sigmoid_grouped",
            fp32_routing_weights=True,
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            shared_expert_intermediate_size=moe_intermediate * hf.get("n_shared_experts", 1),
            num_mtp_layers=hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0,
        )
