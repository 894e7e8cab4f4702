"""The architecture of bisllm-tiny-moe: a small Qwen3-MoE (transformers' own class)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import Qwen3MoeConfig

from recipe.chat_template import END_OF_TEXT, IM_END, SPECIAL_TOKENS


@dataclass(frozen=True)
class Shape:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 320
    max_position_embeddings: int = 2048


def make_config(shape: Shape) -> Qwen3MoeConfig:
    end_of_text, im_end = SPECIAL_TOKENS.index(END_OF_TEXT), SPECIAL_TOKENS.index(IM_END)
    return Qwen3MoeConfig(
        **asdict(shape),
        intermediate_size=4 * shape.hidden_size,  # dense MLP width; unused, every layer is MoE
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,  # keeps the experts in use, so routing stays real
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=im_end,
        pad_token_id=end_of_text,
        bos_token_id=None,
    )
