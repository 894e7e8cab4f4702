"""MTP drafts: the checkpoint's own multi-token-prediction (NextN) layer as the draft model.

DeepSeek-V3 and GLM-4.5 train a layer that predicts the token after next from the main
model's hidden state and the next token: exactly a draft model's job. As SGLang and vLLM do,
only the first NextN layer is run, chained on its own output for every further draft token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bisllm_server.engine.attention import AttentionBackend
from bisllm_server.engine.models.decoder import DecoderForCausalLM
from bisllm_server.engine.speculative.draft_model import DraftModel, KVLayout


class MtpUnavailableError(ValueError):
    """The checkpoint carries no MTP layer to draft with."""


class MtpDraft(DraftModel):
    def __init__(self, target: DecoderForCausalLM) -> None:
        super().__init__()
        if target.mtp is None or not len(target.mtp):
            raise MtpUnavailableError(
                "speculative decoding with MTP needs the checkpoint's NextN layers, but this "
                "checkpoint has none (num_nextn_predict_layers is 0, or their weights "
                f"model.layers.{target.config.num_layers}.* are absent)"
            )
        cfg = target.config
        self.layer = target.mtp[0]
        # The layer's attention was numbered after the main layers; in the draft's own pool
        # it is layer 0.
        self.layer.block.self_attn.layer_id = 0
        self.embed_tokens = target.model.embed_tokens
        self.rotary_emb = target.model.rotary_emb
        # The shared head, not registered as a parameter here: it belongs to the target.
        self._head = target.head_weight.data
        kv_heads, head_dim, v_head_dim, shared = cfg.kv_cache_layout
        self.kv_layout = KVLayout(kv_heads, head_dim, v_head_dim, shared)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        layer = self.layer
        embeds = layer.enorm(self.embed_tokens(input_ids))
        x = layer.eh_proj(torch.cat((embeds, layer.hnorm(hidden.to(embeds.dtype))), dim=-1))
        cos, sin = self.rotary_emb(positions, x.dtype)
        return layer.block(x, positions, cos, sin, attn)

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layer.norm(hidden), self._head).argmax(dim=-1)
