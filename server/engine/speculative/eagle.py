"""EAGLE draft heads, loaded from a separate checkpoint directory (`speculative_model_dir`).

Two released layouts:

EAGLE / EAGLE-2 (config `num_hidden_layers` 1, tensors `fc.*`, `layers.0.*`): the input is
fc([embed(t_{p+1}), h_p]) with h_p the target's final hidden state (after its last norm);
one Llama decoder layer, whose input norm the first layer usually lacks; the output goes
straight into the target's head.

EAGLE-3 (config `draft_vocab_size`, tensors `fc.weight` [H, 3H], `midlayer.*`, `norm`,
`lm_head`, `d2t`, `t2d`): the first step fuses three target layers' outputs (low, middle,
high) through fc; later steps take the head's own output instead. The layer's attention reads
[input_layernorm(embed), hidden_norm(h)] (2H wide, embedding first) and its residual is h; a
final norm and a head over a smaller draft vocabulary follow, whose ids map to target ids as
id + d2t[id]. Which target layers: `eagle_config.eagle_aux_hidden_state_layer_ids`, else
layers 1, L/2 - 1 and L - 4 (the inputs of layers 2, L/2 and L - 3, SGLang's default).

Both take the token embedding from the target unless the checkpoint carries its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from bisllm_server.engine.attention import AttentionBackend
from bisllm_server.engine.layers.mlp import SwiGLUMLP
from bisllm_server.engine.layers.norm import RMSNorm
from bisllm_server.engine.layers.rotary import RotaryEmbedding
from bisllm_server.engine.models.decoder import Attention, DecoderForCausalLM, DecoderLayer
from bisllm_server.engine.models.llama import LlamaForCausalLM
from bisllm_server.engine.models.weights import (
    CheckpointMismatchError,
    WeightMapper,
    load_checkpoint_weights,
)
from bisllm_server.engine.speculative.draft_model import DraftModel, KVLayout


class EagleCheckpointError(ValueError):
    """The speculative model directory does not hold a usable EAGLE head."""


class Eagle3Layer(nn.Module):
    def __init__(self, attention: Attention, hidden: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLUMLP(hidden, intermediate)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        x = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)
        h = hidden + self.self_attn(x, positions, cos, sin, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class EagleDraft(DraftModel):
    def __init__(
        self,
        hf_config: dict[str, Any],
        target: DecoderForCausalLM,
        *,
        eagle3: bool,
        fc_bias: bool = False,
    ) -> None:
        super().__init__()
        cfg = LlamaForCausalLM.parse_config(hf_config)
        if cfg.hidden_size != target.config.hidden_size:
            raise EagleCheckpointError(
                f"EAGLE head hidden_size {cfg.hidden_size} does not match the target model's "
                f"{target.config.hidden_size}"
            )
        self.eagle3 = eagle3
        hidden, num_target_layers = cfg.hidden_size, target.config.num_layers
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope, cfg.max_position_embeddings)
        self.kv_layout = KVLayout(cfg.num_kv_heads, cfg.head_dim)
        self.embed_tokens: nn.Embedding | None = None  # set when the checkpoint has one
        # The target's tensors, held as plain tensors so they are not parameters of the head.
        self._target_embed = target.model.embed_tokens.weight.data
        self._target_head = target.head_weight.data
        if eagle3:
            eagle_cfg = hf_config.get("eagle_config") or {}
            layers = eagle_cfg.get("eagle_aux_hidden_state_layer_ids")
            if layers is None:
                # Clamped, so that targets shallower than four layers still get three.
                defaults = (1, num_target_layers // 2 - 1, num_target_layers - 4)
                layers = [max(0, min(i, num_target_layers - 1)) for i in defaults]
            bad = [i for i in layers if not 0 <= int(i) < num_target_layers]
            if bad:
                raise EagleCheckpointError(
                    f"eagle_config.eagle_aux_hidden_state_layer_ids: layer {bad[0]} is not one "
                    f"of the target's layers 0..{num_target_layers - 1}"
                )
            self.aux_layers = tuple(int(i) for i in layers)
            self.fc = nn.Linear(len(self.aux_layers) * hidden, hidden, bias=False)
            attention = Attention(cfg, 0)
            # The fused q/k/v projection reads the 2H-wide [embedding, hidden] input.
            attention.qkv_proj = nn.Linear(
                2 * hidden, attention.q_size + 2 * attention.kv_size, bias=cfg.qkv_bias
            )
            self.midlayer = Eagle3Layer(attention, hidden, cfg.intermediate_size, cfg.rms_norm_eps)
            self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
            draft_vocab = int(hf_config.get("draft_vocab_size") or cfg.vocab_size)
            self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.int64))
        else:
            self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
            self.layers = nn.ModuleList([DecoderLayer(cfg, 0, moe=False)])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(input_ids)
        return F.embedding(input_ids, self._target_embed)

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        embeds = self.embed(input_ids)
        hidden = hidden.to(embeds.dtype)
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        if self.eagle3:
            if hidden.shape[-1] != embeds.shape[-1]:  # the target's fused features: first step
                hidden = self.fc(hidden)
            return self.midlayer(embeds, hidden, positions, cos, sin, attn)
        x = self.fc(torch.cat((embeds, hidden), dim=-1))
        return self.layers[0](x, positions, cos, sin, attn)

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.eagle3:
            draft_ids = self.lm_head(self.norm(hidden)).argmax(dim=-1)
            return draft_ids + self.d2t[draft_ids]
        return F.linear(hidden, self._target_head).argmax(dim=-1)


def load_eagle_head(
    path: str | Path,
    target: DecoderForCausalLM,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> EagleDraft:
    """The EAGLE or EAGLE-3 head in `path` (config.json + safetensors), for `target`."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EagleCheckpointError(f"speculative model: {config_path} does not exist")
    hf_config = json.loads(config_path.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EagleCheckpointError(f"speculative model: no *.safetensors in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = f.get_tensor(name)
    eagle3 = any(name.startswith("midlayer.") for name in tensors)
    if not eagle3 and "layers.0.post_attention_layernorm.weight" not in tensors:
        raise EagleCheckpointError(
            f"speculative model {path}: neither an EAGLE-3 head (midlayer.*) nor an EAGLE head "
            "(layers.0.*)"
        )
    try:
        head = EagleDraft(hf_config, target, eagle3=eagle3, fc_bias="fc.bias" in tensors)
    except EagleCheckpointError as exc:
        raise EagleCheckpointError(f"speculative model {path}: {exc}") from exc
    except ValueError as exc:  # the config is not a Llama layer this engine can run
        raise EagleCheckpointError(f"speculative model {path}: config.json: {exc}") from exc
    if "embed_tokens.weight" in tensors:
        head.embed_tokens = nn.Embedding(*tensors["embed_tokens.weight"].shape)
    if not eagle3 and "layers.0.input_layernorm.weight" not in tensors:
        # EAGLE drops the first layer's input norm: fc's output goes into attention as is.
        head.layers[0].input_layernorm = nn.Identity()
    buffers = {"d2t": tensors.pop("d2t", None)}
    tensors.pop("t2d", None)  # the inverse map; d2t is all decoding needs
    attention = head.midlayer.self_attn if eagle3 else head.layers[0].self_attn
    mapper = WeightMapper(head, attention.q_size, attention.kv_size)
    try:
        load_checkpoint_weights(head, tensors.items(), mapper)
    except CheckpointMismatchError as exc:
        raise EagleCheckpointError(f"speculative model {path}: {exc}") from exc
    if eagle3 and buffers["d2t"] is not None:
        if buffers["d2t"].shape != head.d2t.shape:
            raise EagleCheckpointError(
                f"speculative model {path}: d2t has shape {tuple(buffers['d2t'].shape)}, "
                f"expected ({head.lm_head.out_features},)"
            )
        head.d2t.copy_(buffers["d2t"])
    head = head.to(device=device, dtype=dtype)  # d2t stays int64: .to casts floats only
    head.rotary_emb.reset_buffers()  # inv_freq stays float32 whatever the weights' dtype
    return head.eval().requires_grad_(False)
