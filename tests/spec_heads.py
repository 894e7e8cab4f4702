"""Draft-model fixtures for the speculative-decoding tests: a tiny DeepSeek-V3 checkpoint with
an MTP layer, random EAGLE and EAGLE-3 heads for the tiny Qwen3-MoE, and a from-scratch
reference of what a draft model should propose after a given sequence."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_mtp_layers import mtp_tensors, with_extra_tensors

from bisllm_server.engine.attention import TorchAttentionBackend
from bisllm_server.engine.forward_batch import ForwardBatch
from bisllm_server.engine.kv_cache import KVPool
from bisllm_server.engine.models.decoder import DecoderForCausalLM, HiddenCapture
from bisllm_server.engine.speculative.draft_model import DraftModel


def deepseek_with_mtp(src: Path, hf_model, dst: Path) -> Path:  # type: ignore[no-untyped-def]
    return with_extra_tensors(src, dst, mtp_tensors(src, hf_model))


def _randn(gen: torch.Generator, *shape: int, scale: float = 0.15) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm(gen: torch.Generator, dim: int) -> torch.Tensor:
    return 0.5 + torch.rand(dim, generator=gen)


def write_eagle_head(target_dir: Path, dst: Path, *, eagle3: bool, seed: int = 5) -> Path:
    """A random EAGLE (layers.0.*, no input norm, fc with bias) or EAGLE-3 head (midlayer.*,
    a 200-token draft vocabulary mapped through d2t) in the released layouts."""
    target = json.loads((target_dir / "config.json").read_text())
    hidden, heads, kv_heads = (
        target["hidden_size"],
        target["num_attention_heads"],
        target["num_key_value_heads"],
    )
    head_dim, inter, vocab = 32, 96, target["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    config = {
        "architectures": ["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": vocab,
        "hidden_act": "silu",
    }
    attn_in = 2 * hidden if eagle3 else hidden
    layer = "midlayer" if eagle3 else "layers.0"
    tensors = {
        f"{layer}.self_attn.q_proj.weight": _randn(gen, heads * head_dim, attn_in),
        f"{layer}.self_attn.k_proj.weight": _randn(gen, kv_heads * head_dim, attn_in),
        f"{layer}.self_attn.v_proj.weight": _randn(gen, kv_heads * head_dim, attn_in),
        f"{layer}.self_attn.o_proj.weight": _randn(gen, hidden, heads * head_dim),
        f"{layer}.mlp.gate_proj.weight": _randn(gen, inter, hidden),
        f"{layer}.mlp.up_proj.weight": _randn(gen, inter, hidden),
        f"{layer}.mlp.down_proj.weight": _randn(gen, hidden, inter),
        f"{layer}.post_attention_layernorm.weight": _norm(gen, hidden),
    }
    if eagle3:
        draft_vocab = 200
        config["draft_vocab_size"] = draft_vocab
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}
        chosen = torch.randperm(vocab, generator=gen)[:draft_vocab].sort().values
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[chosen] = True
        tensors |= {
            "fc.weight": _randn(gen, hidden, 3 * hidden),
            "midlayer.input_layernorm.weight": _norm(gen, hidden),
            "midlayer.hidden_norm.weight": _norm(gen, hidden),
            "norm.weight": _norm(gen, hidden),
            "lm_head.weight": _randn(gen, draft_vocab, hidden, scale=1.0),
            "d2t": chosen - torch.arange(draft_vocab),
            "t2d": t2d,
        }
    else:
        tensors |= {
            "fc.weight": _randn(gen, hidden, 2 * hidden),
            "fc.bias": _randn(gen, hidden),
        }
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        dst / "model.safetensors",
        metadata={"format": "pt"},
    )
    return dst


def _single_sequence_batch(tokens: list[int], first_position: int, logits_row: int) -> ForwardBatch:
    """A ForwardBatch for one sequence whose position p lives in KV slot p."""
    n = len(tokens)
    positions = torch.arange(first_position, first_position + n)
    return ForwardBatch(
        input_ids=torch.tensor(tokens, dtype=torch.int64),
        positions=positions,
        out_slots=positions.clone(),
        query_lens=[n],
        kv_lens=[first_position + n],
        kv_slots=torch.arange(first_position + n)[None, :],
        logits_indices=torch.tensor([logits_row], dtype=torch.int64),
    )


def _pools(target: DecoderForCausalLM, draft: DraftModel, kv_layout, slots: int):  # type: ignore[no-untyped-def]
    """Attention over fresh single-sequence pools (page size 1: slot = position)."""
    cfg = target.config
    heads, dim, v_dim, shared = kv_layout
    dtype = target.head_weight.dtype
    pool = KVPool(
        cfg.num_layers, heads, dim, slots, 1, dtype, "cpu", v_head_dim=v_dim, shared_kv=shared
    )
    lay = draft.kv_layout
    draft_pool = KVPool(
        draft.num_kv_layers,
        lay.num_kv_heads,
        lay.head_dim,
        slots,
        1,
        dtype,
        "cpu",
        v_head_dim=lay.v_head_dim,
        shared_kv=lay.shared_kv,
    )
    return (
        TorchAttentionBackend(pool.k_buffers, pool.v_buffers),
        TorchAttentionBackend(draft_pool.k_buffers, draft_pool.v_buffers),
    )


@torch.inference_mode()
def draft_hidden_states(
    target: DecoderForCausalLM,
    draft: DraftModel,
    kv_layout: tuple[int, int, int | None, bool],
    tokens: list[int],
    extra_slots: int = 0,
) -> tuple[torch.Tensor, TorchAttentionBackend]:
    """The draft's hidden state at every position of tokens[:-1] (each paired with the token
    after it), from one target forward and one draft forward over a fresh pool; also the
    draft's attention, whose pool has `extra_slots` free positions after them."""
    n = len(tokens) - 1
    attn, draft_attn = _pools(target, draft, kv_layout, n + extra_slots)
    fb = _single_sequence_batch(tokens[:-1], 0, n - 1)
    capture = HiddenCapture(aux_layers=draft.aux_layers)
    attn.begin(fb)
    target(fb, attn, capture)
    draft_fb = _single_sequence_batch(tokens[1:], 0, n - 1)
    draft_attn.begin(draft_fb)
    features = draft.target_features(capture)
    return draft(draft_fb.input_ids, features, draft_fb.positions, draft_attn), draft_attn


@torch.inference_mode()
def reference_drafts(
    target: DecoderForCausalLM,
    draft: DraftModel,
    kv_layout: tuple[int, int, int | None, bool],
    tokens: list[int],
    k: int,
) -> list[int]:
    """What the draft model proposes after `tokens`, computed from scratch on one sequence:
    the target's hidden states over tokens[:-1], the draft over them paired with tokens[1:],
    then k - 1 chained steps on the draft's own output. No pages, no prefix cache, no
    earlier steps."""
    n = len(tokens) - 1
    hidden, draft_attn = draft_hidden_states(target, draft, kv_layout, tokens, extra_slots=k)
    hidden = hidden[-1:]
    proposed = [int(draft.propose(hidden)[0])]
    for step in range(1, k):
        step_fb = _single_sequence_batch([proposed[-1]], n - 1 + step, 0)
        draft_attn.begin(step_fb)
        hidden = draft(step_fb.input_ids, hidden, step_fb.positions, draft_attn)
        proposed.append(int(draft.propose(hidden)[0]))
    return proposed
