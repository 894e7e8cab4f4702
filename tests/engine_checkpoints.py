"""Tiny random HF checkpoints (built with transformers' own classes) for the engine tests.

`build_checkpoint(family, path, **overrides)` writes config.json, safetensors weights in the
hub's per-expert layout (what `save_pretrained` produces by default), generation_config.json
and a small byte-level BPE tokenizer. Weights are re-drawn with a larger spread than
transformers' init, and every norm weight and bias is randomised, because unit norms and zero
biases would let bugs in those paths go unnoticed.
"""

from __future__ import annotations

import fnmatch
import functools
import string
import textwrap
from pathlib import Path
from typing import Any

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, BOS, PAD]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
VOCAB_SIZE = 320  # model vocab; the tokenizer uses the first TOKENIZER_VOCAB ids
TOKENIZER_VOCAB = 300

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=0,
    bos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # head_dim 32 != hidden / heads = 16: catches a silent fallback to hidden / heads.
    "qwen3_moe": dict(
        _COMMON,
        num_hidden_layers=3,
        head_dim=32,
        intermediate_size=96,
        moe_intermediate_size=48,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
    ),
    "mixtral": dict(
        _COMMON,
        num_hidden_layers=2,
        intermediate_size=48,
        num_local_experts=8,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
    ),
    "llama": dict(
        _COMMON,
        num_hidden_layers=2,
        intermediate_size=96,
        attention_bias=True,
        mlp_bias=True,
        rms_norm_eps=1e-5,
    ),
    # GLM-4.5's shape: dense first layer, then MoE with a shared expert, QK-norm, q/k/v biases,
    # RoPE on half of each head. Two expert groups (one kept) exercise DeepSeek-style group
    # limiting, which the released GLM configs switch off (n_group 1).
    "glm4_moe": dict(
        _COMMON,
        num_hidden_layers=3,
        head_dim=32,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        use_qk_norm=True,
        attention_bias=True,
        rms_norm_eps=1e-5,
    ),
    # DeepSeek-V3's shape in miniature: MLA with q LoRA, yarn RoPE (factor 4, mscale_all_dim
    # set, so the softmax scale changes) in the interleaved layout, a dense first layer, then
    # grouped sigmoid routing with a shared expert. v_head_dim differs from qk_nope_head_dim
    # and kv_lora_rank from both, so no two of them can be swapped silently.
    "deepseek_v3": dict(
        _COMMON,
        num_hidden_layers=3,
        num_key_value_heads=4,  # MLA has no GQA; transformers' default would be 128
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=24,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10_000.0,
            factor=4.0,
            original_max_position_embeddings=128,  # x factor = max_position_embeddings
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        rms_norm_eps=1e-6,
    ),
    # GPT-OSS in miniature: sliding (window 8, shorter than most test prompts), full,
    # sliding; sinks; yarn RoPE without truncation; biased router and experts. The SwiGLU
    # limit is lowered from 7 so the clamps act on these small activations.
    "gpt_oss": dict(
        _COMMON,
        num_hidden_layers=3,
        head_dim=16,
        intermediate_size=64,  # a multiple of 32, as MXFP4 blocks need
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        swiglu_limit=1.0,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150_000.0,
            factor=4.0,
            original_max_position_embeddings=128,  # x factor = max_position_embeddings
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
        ),
        rms_norm_eps=1e-5,
    ),
    # Llama 4 in miniature: layers 0-2 chunked (16 positions) with RoPE and QK norm, layer 3
    # NoPE and global; MoE on layers 1 and 3 (top-1 on the input, shared expert), dense 0
    # and 2; temperature tuning from position 7 on (floor_scale 8) so it acts in the tests.
    "llama4": dict(
        _COMMON,
        num_hidden_layers=4,
        head_dim=16,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_local_experts=8,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        attention_chunk_size=16,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=8,
        attn_scale=0.1,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500_000.0,
            factor=16.0,
            low_freq_factor=1.0,
            high_freq_factor=1.0,
            original_max_position_embeddings=32,  # x factor = max_position_embeddings
        ),
        rms_norm_eps=1e-5,
    ),
}

# name -> (family, config overrides, save_pretrained kwargs): the variants the tests cover.
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "qwen3_moe": ("qwen3_moe", {}, {}),
    # Layer 1 is MoE by decoder_sparse_step=2; layer 3 would be too but is in mlp_only_layers.
    "qwen3_moe_mixed": (
        "qwen3_moe",
        dict(
            num_hidden_layers=4,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            norm_topk_prob=False,
            tie_word_embeddings=True,
        ),
        {},
    ),
    "qwen3_moe_sharded": ("qwen3_moe", {}, dict(max_shard_size="100KB")),
    # One KV head for four query heads: tensor-parallel ranks share it.
    "qwen3_moe_mqa": ("qwen3_moe", dict(num_key_value_heads=1), {}),
    "mixtral": ("mixtral", {}, {}),
    "llama": ("llama", {}, {}),
    "glm4_moe": ("glm4_moe", {}, {}),
    "deepseek_v3": ("deepseek_v3", {}, {}),
    # V2-Lite-style attention: one q_proj, no yarn, half-split RoPE, attention biases.
    "deepseek_v3_plain": (
        "deepseek_v3",
        dict(
            q_lora_rank=None,
            rope_parameters=dict(rope_type="default", rope_theta=10_000.0),
            rope_interleave=False,
            attention_bias=True,
        ),
        {},
    ),
    "gpt_oss": ("gpt_oss", {}, {}),
    "llama4": ("llama4", {}, {}),
    # Maverick's choices: no QK norm, plain RoPE, every layer MoE, top-2 (input-side weights
    # summed over two slots), and 12-position chunks.
    "llama4_maverick": (
        "llama4",
        dict(
            use_qk_norm=False,
            interleave_moe_layer_step=1,
            num_experts_per_tok=2,
            attention_chunk_size=12,
            rope_parameters=dict(rope_type="default", rope_theta=500_000.0),
        ),
        {},
    ),
    "llama3_rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500_000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,  # x factor = max_position_embeddings
            ),
            attention_bias=False,
            mlp_bias=False,
        ),
        {},
    ),
}


def _classes(family: str) -> tuple[type, type]:
    import transformers

    names = {
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
        "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
        "llama4": ("Llama4TextConfig", "Llama4ForCausalLM"),
    }
    if family not in names:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(names)}")
    config_name, model_name = names[family]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _training_text() -> list[str]:
    """A few hundred lines of Python from the standard library: always there, no download."""
    lines: list[str] = []
    for module in (textwrap, string, fnmatch):
        lines += [line for line in Path(module.__file__).read_text().splitlines() if line.strip()]
    return lines[:600]


@functools.cache
def build_tokenizer() -> Any:
    """Byte-level BPE (256 byte symbols + specials + merges) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    # A minimal plain-text chat template so chat endpoints can render prompts in tests.
    fast.chat_template = CHAT_TEMPLATE
    return fast


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):  # input/post-attention/final norms and q_norm/k_norm
            values = 0.5 + torch.rand(param.shape, generator=gen)
        elif name.endswith("bias"):
            values = 0.1 * torch.randn(param.shape, generator=gen)
        elif "embed_tokens" in name:
            values = 0.2 * torch.randn(param.shape, generator=gen)
        else:
            # ~1/sqrt(fan_in): logits spread out enough that greedy picks are never near-ties.
            values = torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5
        param.copy_(values)
    for name, buffer in model.named_buffers():
        # DeepSeek / GLM routing bias (a buffer, zero at init): shifts which experts are chosen.
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(0.2 * torch.randn(buffer.shape, generator=gen))


def build_checkpoint(
    family: str,
    path: Path,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random `family` checkpoint (a key of FAMILY_DEFAULTS) into `path`.

    `overrides` are config fields; `max_shard_size` (e.g. "100KB") writes a sharded checkpoint
    with model.safetensors.index.json."""
    config_cls, model_cls = _classes(family)
    config = config_cls(**{**FAMILY_DEFAULTS[family], **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomize(model, seed)
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    build_tokenizer().save_pretrained(path)
    return path


def build_variant(name: str, path: Path) -> Path:
    family, overrides, save = VARIANTS[name]
    return build_checkpoint(family, path, **overrides, **save)


def reference_model(path: Path | str) -> Any:
    """The transformers model in fp32 with eager attention and eager experts."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    return model.eval()


def reference_greedy(path: Path | str, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' fp32 greedy continuation of `prompt`, going on past EOS."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference_model(path).generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            eos_token_id=None,
            pad_token_id=2,
        )
    return out[0, len(prompt) :].tolist()
