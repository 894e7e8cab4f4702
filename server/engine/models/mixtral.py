"""Mixtral: every layer is MoE (softmax top-k, always renormalised), no biases.

Checkpoints name the block `block_sparse_moe` and the experts' projections w1 (gate), w3 (up)
and w2 (down); they are renamed onto the shared decoder's `mlp.experts.E.*_proj` names.
"""

from __future__ import annotations

from typing import Any, ClassVar

from bisllm_server.engine.models.config import DecoderConfig, UnsupportedModelError, common_fields
from bisllm_server.engine.models.decoder import DecoderForCausalLM


class MixtralForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"\.block_sparse_moe\.", ".mlp."),
        (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
        (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."),
        (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."),
    )

    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        fields = common_fields(
            hf_config, default_theta=1_000_000.0, default_eps=1e-5, default_max_positions=131072
        )
        window = hf_config.get("sliding_window")
        if window is not None and window < fields["max_position_embeddings"]:
            raise UnsupportedModelError(
                f"Mixtral with sliding_window={window} is not supported (only null / no window)"
            )
        return DecoderConfig(
            **fields,
            moe_layers=frozenset(range(fields["num_layers"])),
            num_experts=hf_config.get("num_local_experts") or hf_config.get("num_experts") or 8,
            top_k=hf_config.get("num_experts_per_tok") or 2,
            # Mixtral's experts are `intermediate_size` wide; it has no dense layers.
            moe_intermediate_size=hf_config.get("intermediate_size") or 14336,
            renormalize=True,
            fp32_routing_weights=True,
        )
