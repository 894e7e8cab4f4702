"""Llama 4 text (`llama4_text`; Llama-4-Scout, Llama-4-Maverick).

- Layers with RoPE (`no_rope_layers[i] == 1`; by default all but every
  `no_rope_layer_interval`-th) use adjacent-pair rotary (Meta's layout) on the whole head,
  then, with `use_qk_norm`, a weightless RMS normalisation of q and k; they attend within
  blocks of `attention_chunk_size` positions ("chunked_attention" in `layer_types`).
- NoPE layers attend to the whole context without rotary; with `attn_temperature_tuning`
  their queries are scaled up at positions past `floor_scale`.
- MoE layers (`moe_layers`, else every `interleave_moe_layer_step`-th layer): top-k (1) of
  the raw router logits, sigmoid, applied to the expert's input; a shared expert of
  `intermediate_size` always added. Dense layers are SwiGLU MLPs of `intermediate_size_mlp`.

Checkpoints name the block `feed_forward` with `router`, `shared_expert` and fused experts in
the hub layout `experts.gate_up_proj` [E, H, 2I] (gate half, then up half) and
`experts.down_proj` [E, I, H]. The released repos are multimodal (`Llama4Config` with a
`text_config`, tensors under `language_model.`); their text part loads here and the vision
tower's tensors are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch

from bisllm_server.engine.models.config import (
    DecoderConfig,
    UnsupportedModelError,
    checked_layer_types,
    common_fields,
)
from bisllm_server.engine.models.decoder import DecoderForCausalLM

LAYER_TYPES = ("chunked_attention", "full_attention")
# Tensors of the multimodal checkpoints that belong to the vision tower.
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config: `text_config` of a multimodal Llama-4 config.json (keeping
    its token ids when the text part omits them), else the config itself."""
    text = hf_config.get("text_config")
    if not isinstance(text, dict):
        return hf_config
    merged = dict(text)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings"):
        if merged.get(key) is None and hf_config.get(key) is not None:
            merged[key] = hf_config[key]
    return merged


class Llama4ForCausalLM(DecoderForCausalLM):
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"\.feed_forward\.", ".mlp."),
        (r"\.mlp\.router\.", ".mlp.gate."),
        (r"\.mlp\.shared_expert\.", ".mlp.shared_experts."),
    )

    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        hf = text_config(hf_config)
        fields = common_fields(
            hf, default_theta=500_000.0, default_eps=1e-5, default_max_positions=131072
        )
        num_layers = fields["num_layers"]
        interval = hf.get("no_rope_layer_interval") or 4
        uses_rope = hf.get("no_rope_layers") or [
            int((i + 1) % interval != 0) for i in range(num_layers)
        ]
        if len(uses_rope) < num_layers:
            raise UnsupportedModelError(
                f"no_rope_layers lists {len(uses_rope)} layers, the model has {num_layers}"
            )
        chunk = hf.get("attention_chunk_size", 8192)
        layer_types = checked_layer_types(
            hf.get("layer_types")
            or (
                "chunked_attention" if uses_rope[i] and chunk is not None else "full_attention"
                for i in range(num_layers)
            ),
            num_layers,
            LAYER_TYPES,
        )
        step = hf.get("interleave_moe_layer_step") or 1
        moe_layers = hf.get("moe_layers")
        if moe_layers is None:
            moe_layers = range(step - 1, num_layers, step)
        expert_intermediate = hf.get("intermediate_size") or 8192
        return DecoderConfig(
            **{**fields, "intermediate_size": hf.get("intermediate_size_mlp") or 16384},
            qkv_bias=bool(hf.get("attention_bias", False)),
            o_bias=bool(hf.get("attention_bias", False)),
            rope_interleave=True,
            nope_layers=frozenset(i for i in range(num_layers) if not uses_rope[i]),
            qk_l2_norm=bool(hf.get("use_qk_norm", True)),
            layer_types=layer_types,
            attention_chunk_size=chunk,
            attn_temperature_tuning=bool(hf.get("attn_temperature_tuning", True)),
            attn_scale=float(hf.get("attn_scale", 0.1)),
            floor_scale=float(hf.get("floor_scale", 8192)),
            moe_layers=frozenset(moe_layers),
            num_experts=hf.get("num_local_experts") or 16,
            top_k=hf.get("num_experts_per_tok") or 1,
            moe_intermediate_size=expert_intermediate,
            router="sigmoid_topk_input",
            shared_expert_intermediate_size=expert_intermediate,
        )

    def convert_checkpoint_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith(VISION_PREFIXES):
                continue
            name = name.removeprefix("language_model.")
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                # Hub [E, in, out] -> [E, out, in]; gate_up's halves are already gate | up.
                tensor = tensor.transpose(1, 2)
            yield name, tensor
