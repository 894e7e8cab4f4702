"""One decoder-only transformer shared by every supported family.

Pre-norm layers: x += attn(norm(x)); x += mlp(norm(x)), where mlp is a dense SwiGLU or a sparse
MoE block per layer. q/k/v and gate/up are fused into single matmuls; `load_weights` fills
their slices from the per-projection checkpoint tensors. Families subclass `DecoderForCausalLM`
to parse their config and rename (or re-lay) checkpoint tensors, nothing else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bisllm_server.engine.attention import AttentionBackend
from bisllm_server.engine.forward_batch import ForwardBatch
from bisllm_server.engine.layers.mlp import SwiGLUMLP, clamped_swiglu, silu_and_mul
from bisllm_server.engine.layers.moe import SparseMoE
from bisllm_server.engine.layers.norm import RMSNorm, rms_norm
from bisllm_server.engine.layers.rotary import (
    RotaryEmbedding,
    apply_rotary,
    interleaved_to_half_split,
)
from bisllm_server.engine.models.config import DecoderConfig
from bisllm_server.engine.models.mla import MlaAttention
from bisllm_server.engine.models.weights import WeightMapper, load_checkpoint_weights
from bisllm_server.engine.parallel.tensor_parallel import SINGLE, TPGroup, TPSlices


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self._qk_norm_weight: torch.Tensor | None = None  # built at first use, after loading
        self.use_rope = layer_id not in cfg.nope_layers
        self.rope_interleave = cfg.rope_interleave
        self.qk_l2_norm_eps = cfg.rms_norm_eps if cfg.qk_l2_norm and self.use_rope else None
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.attn_scale, self.floor_scale = cfg.attn_scale, cfg.floor_scale
        layer_type = cfg.layer_type(layer_id)
        self.sliding_window = cfg.sliding_window if layer_type == "sliding_attention" else None
        self.chunk_size = cfg.attention_chunk_size if layer_type == "chunked_attention" else None
        self.sinks = nn.Parameter(torch.empty(cfg.num_heads)) if cfg.attention_sinks else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            if self._qk_norm_weight is None:
                # Per-head norms of q and k in one op: each head row gets its own weight row.
                self._qk_norm_weight = torch.cat(
                    (
                        self.q_norm.weight.expand(self.num_heads, -1),
                        self.k_norm.weight.expand(self.num_kv_heads, -1),
                    )
                )
            qk = rms_norm(qk, self._qk_norm_weight, self.q_norm.eps)
        if self.use_rope:
            if self.rope_interleave:
                qk = interleaved_to_half_split(qk)  # v keeps its layout
            # q and k share the rotation, so they are rotated as one tensor.
            qk = apply_rotary(qk, cos, sin)
        if self.qk_l2_norm_eps is not None:
            qk = F.rms_norm(qk.float(), (self.head_dim,), eps=self.qk_l2_norm_eps).to(qk.dtype)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        if self.temperature_tuning:
            # Exactly 1 below position floor_scale - 1: only long contexts are sharpened.
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale))
            q = (q * (scales * self.attn_scale + 1.0)[:, None, None]).to(q.dtype)
        out = attn.forward(
            self.layer_id,
            q,
            k,
            v.view(n, self.num_kv_heads, self.head_dim),
            self.scale,
            sliding_window=self.sliding_window,
            chunk_size=self.chunk_size,
            sinks=self.sinks,
        )
        return self.o_proj(out.reshape(n, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_id: int, moe: bool | None = None) -> None:
        """`moe` overrides the config's choice of MoE vs dense for this layer."""
        super().__init__()
        self.self_attn: nn.Module = (
            MlaAttention(cfg, layer_id) if cfg.attention == "mla" else Attention(cfg, layer_id)
        )
        self.mlp: nn.Module
        if layer_id in cfg.moe_layers if moe is None else moe:
            activation = (
                functools.partial(clamped_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
                if cfg.expert_activation == "clamped_swiglu"
                else silu_and_mul
            )
            self.mlp = SparseMoE(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.top_k,
                cfg.renormalize,
                router=cfg.router,
                n_group=cfg.n_group,
                topk_group=cfg.topk_group,
                routed_scaling_factor=cfg.routed_scaling_factor,
                shared_intermediate_size=cfg.shared_expert_intermediate_size,
                fp32_weights=cfg.fp32_routing_weights,
                router_bias=cfg.router_bias,
                expert_bias=cfg.expert_bias,
                activation=activation,
            )
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        eps, fp32_scale = cfg.rms_norm_eps, cfg.norm_fp32_scale
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, fp32_scale)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, fp32_scale)
        # Tensor parallel: attention and MLP outputs are partial sums, reduced over the group.
        self.tp: TPGroup = SINGLE

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, cos, sin, attn)
        x = x + (h if self.tp.dp_attention else self.tp.all_reduce(h))
        return x + self.feed_forward(self.post_attention_layernorm(x))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP / MoE block over this rank's tokens; under DP attention it runs over every
        rank's tokens (gathered), and this rank keeps its rows of the reduced result. Under
        all-to-all expert parallelism (`TPGroup.moe_all_to_all`) the block is whole here but
        for the routed experts, which send this rank's tokens to their ranks and back."""
        if self.tp.moe_all_to_all:
            return self.mlp(x)
        if not self.tp.dp_attention:
            return self.tp.all_reduce(self.mlp(x))
        rows, start, count = self.tp.gather_tokens(x)
        return self.tp.all_reduce(self.mlp(rows))[start : start + count]


class MtpLayer(nn.Module):
    """One multi-token-prediction (NextN) layer of DeepSeek-V3 / GLM-4.5: it predicts the token
    after next from the main model's last hidden state h and the next token's embedding e as
    norm(block(eh_proj([enorm(e), hnorm(h)]))), through the shared head. Speculative decoding
    runs it as a draft model (`speculative/mtp.py`).

    Checkpoint names: model.layers.{num_layers + i}.{enorm, hnorm, eh_proj, shared_head.norm}
    and the block's own decoder-layer tensors; the embedding and head are shared."""

    def __init__(self, cfg: DecoderConfig, layer_id: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, layer_id, moe=bool(cfg.moe_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderModel(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_fp32_scale)
        self.rotary_emb = RotaryEmbedding(cfg.rope_head_dim, cfg.rope, cfg.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        aux_layers: tuple[int, ...] = (),
        aux_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the last layer, before the final norm: [T, hidden]. The outputs
        of the layers in `aux_layers` are appended to `aux_out`, in that order."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)  # once per step, shared by all layers
        outputs: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cos, sin, attn)
            if i in aux_layers:
                outputs[i] = x
        if aux_out is not None:
            aux_out.extend(outputs[i] for i in aux_layers)
        return x


@dataclass
class HiddenCapture:
    """Asks a forward for the hidden states a draft model reads, beside the logits: every
    token's final hidden state after the last norm (MTP, EAGLE), and the outputs of
    `aux_layers` side by side (EAGLE-3's low, middle and high features)."""

    aux_layers: tuple[int, ...] = ()
    final: torch.Tensor | None = None  # [T, hidden]
    aux: torch.Tensor | None = None  # [T, len(aux_layers) * hidden]


class DecoderForCausalLM(nn.Module):
    """Base class of the family models; built from a config.json dict."""

    # (regex, replacement) pairs mapping a family's checkpoint names onto this module tree.
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    @classmethod
    def parse_config(cls, hf_config: dict[str, Any]) -> DecoderConfig:
        raise NotImplementedError

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        self.config = self.parse_config(hf_config)
        self.model = DecoderModel(self.config)
        # Tied models use the embedding matrix as the head; no separate parameter exists.
        self.lm_head = (
            None
            if self.config.tie_word_embeddings
            else nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        )
        cfg = self.config
        self.mtp: nn.ModuleList | None = (
            nn.ModuleList(MtpLayer(cfg, cfg.num_layers + i) for i in range(cfg.num_mtp_layers))
            if cfg.num_mtp_layers
            else None
        )
        # Tensor parallel (parallel/tensor_parallel.py): the embedding and the head hold this
        # rank's share of the vocabulary, the logits are gathered; what the loader reads of
        # each tensor.
        self.tp: TPGroup = SINGLE
        self.tp_slices: TPSlices | None = None

    # no_grad rather than inference_mode: callers may edit the returned logits in place.
    @torch.no_grad()
    def forward(
        self, batch: ForwardBatch, attn: AttentionBackend, capture: HiddenCapture | None = None
    ) -> torch.Tensor:
        """float32 logits [N, vocab] for the rows `batch.logits_indices`; `capture`, when
        given, receives hidden states of every token.

        The caller runs `attn.begin(batch)` first (the model runner does), so the step's
        attention metadata is built once, outside the model."""
        if capture is None:
            hidden = self.model(batch.input_ids, batch.positions, attn)
            # The final norm and the head are per row: only where logits are needed.
            hidden = self.model.norm(hidden[batch.logits_indices])
        else:
            aux: list[torch.Tensor] = []
            hidden = self.model(batch.input_ids, batch.positions, attn, capture.aux_layers, aux)
            capture.final = self.model.norm(hidden)
            capture.aux = torch.cat(aux, dim=-1) if aux else None
            hidden = capture.final[batch.logits_indices]
        logits = F.linear(hidden, self.head_weight)
        if not self.tp.dp_attention:  # each rank scored its share of the vocabulary
            logits = self.tp.all_gather(logits, dim=-1)
        return logits.float()

    @torch.no_grad()
    def idle_forward(self) -> None:
        """DP attention, a rank without a batch this step: take part in every layer's token
        gather and reduce (or, under all-to-all expert parallelism, every MoE layer's
        exchanges) with no tokens of its own, as the busy ranks expect."""
        x = torch.empty(0, self.config.hidden_size, dtype=self.head_weight.dtype)
        x = x.to(self.head_weight.device)
        for layer in self.model.layers:
            x = x + layer.feed_forward(x)

    @property
    def head_weight(self) -> torch.Tensor:
        """[vocab, hidden]: the output head, or the embedding matrix of a tied model."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def convert_checkpoint_tensors(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors as `load_weights` expects them; families whose hub layout
        differs (transposed or interleaved fused experts, wrapper prefixes) override this."""
        yield from weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF checkpoint tensors into the parameters (see `weights.py` for the name
        mapping); raises CheckpointMismatchError naming unknown, misshapen or missing tensors."""
        weights = self.convert_checkpoint_tensors(weights)
        cfg = self.config
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if self.tp.size > 1 and isinstance(attn := self.model.layers[0].self_attn, Attention):
            q_size, kv_size = attn.q_size, attn.kv_size  # this rank's heads
        mapper = WeightMapper(self, q_size, kv_size)
        # A tied head has no parameter of its own; a checkpoint may still carry a copy.
        skip = ["lm_head.weight"] if self.lm_head is None else []
        renames = list(self.checkpoint_renames)
        for i in range(cfg.num_mtp_layers):
            layer = rf"^model\.layers\.{cfg.num_layers + i}\."
            renames += [
                (layer + r"(enorm|hnorm|eh_proj)\.", rf"mtp.{i}.\1."),
                (layer + r"shared_head\.norm\.", rf"mtp.{i}.norm."),
                (layer, rf"mtp.{i}.block."),
            ]
            # Copies of the shared embedding and head that some MTP checkpoints carry.
            prefix = f"model.layers.{cfg.num_layers + i}."
            skip += [prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"]
        found_mtp = load_checkpoint_weights(
            self, weights, mapper, renames, skip, optional_prefix="mtp.", tp=self.tp_slices
        )
        if self.mtp is not None and not found_mtp:
            self.mtp = None  # checkpoints saved by transformers leave the MTP layers out
        for module in self.modules():
            if isinstance(module, Attention):
                module._qk_norm_weight = None
