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

from bisllm_server.engine.models.config import DecoderConfig, common_fields, grouped_moe_fields
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
        return DecoderConfig(
            **fields,
            **grouped_moe_fields(
                hf,
                fields["num_layers"],
                default_experts=128,
                default_first_dense=1,
                default_moe_intermediate=1408,
                default_scaling=1.0,
            ),
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=False,
            qk_norm=bool(hf.get("use_qk_norm", False)),
        )
