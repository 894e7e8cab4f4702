"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a compressed KV cache.

Per token, the checkpoint's `kv_a_proj_with_mqa` gives a latent c (kv_lora_rank, normalised
by `kv_a_layernorm`) and one rotary key k_pe (qk_rope_head_dim) shared by all heads;
`kv_b_proj` would expand c into each head's non-rotary key and its value. The cache holds only
[c, rotated k_pe] per token and layer (KVPool with shared_kv), and the expansion is never
materialised: it is absorbed into the query and the output instead.

    score_h = q_nope_h · (W_UK_h c) + q_pe_h · k_pe = (W_UK_hᵀ q_nope_h) · c + q_pe_h · k_pe
    out_h   = Σ_t p_t W_UV_h c_t = W_UV_h (Σ_t p_t c_t)

So attention runs as multi-query attention with one KV "head" of width kv_lora_rank +
qk_rope_head_dim whose values are its first kv_lora_rank entries (the latent), and the query
of head h is [W_UK_hᵀ q_nope_h, q_pe_h]. The same path serves prefill and decode.
"""

from __future__ import annotations

import torch
from torch import nn

from bisllm_server.engine.attention import AttentionBackend
from bisllm_server.engine.layers.norm import RMSNorm
from bisllm_server.engine.layers.rotary import apply_rotary, interleaved_to_half_split
from bisllm_server.engine.models.config import DecoderConfig

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not the
# config's rms_norm_eps.
LORA_NORM_EPS = 1e-6


class MlaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.kv_lora_rank, self.v_head_dim = cfg.kv_lora_rank, cfg.v_head_dim
        self.rope_interleave = cfg.rope_interleave
        qk_head_dim = self.nope_dim + self.rope_dim
        self.scale = qk_head_dim**-0.5 * cfg.attn_scale_factor
        bias = cfg.qkv_bias  # `attention_bias`: q_a_proj, kv_a_proj_with_mqa and o_proj
        if cfg.q_lora_rank is None:
            self.q_proj: nn.Linear | None = nn.Linear(
                cfg.hidden_size, self.num_heads * qk_head_dim, bias=False
            )
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            cfg.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias
        )
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, cfg.hidden_size, bias=bias)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, C] and W_UV [H, v, C], views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_head_dim, -1)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_interleave:
            x = interleaved_to_half_split(x)  # as transformers does
        return apply_rotary(x, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        n = x.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], -1)
        latent = self.kv_a_layernorm(latent)
        q_pe = self._rotate(q_pe, cos, sin)
        k_pe = self._rotate(k_pe[:, None, :], cos, sin)

        w_uk, w_uv = self._absorbed_weights()
        # [H, T, nope] @ [H, nope, C] -> the query's latent part, per head.
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
        query = torch.cat((q_latent, q_pe), dim=-1)  # [T, H, C + rope]
        key = torch.cat((latent[:, None, :], k_pe), dim=-1)  # [T, 1, C + rope]
        out = attn.forward(self.layer_id, query, key, None, self.scale)  # [T, H, C]
        # [H, T, C] @ [H, C, v] -> each head's value.
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        return self.o_proj(out.reshape(n, self.num_heads * self.v_head_dim))
