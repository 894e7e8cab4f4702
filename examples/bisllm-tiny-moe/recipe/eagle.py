"""Train an EAGLE-3 draft head for bisllm-tiny-moe and save it in the released EAGLE-3 layout.

    python -m recipe.eagle --out eagle3          # from examples/bisllm-tiny-moe/

The head is one Llama-style decoder layer that reads the target's residual stream after layers
0, 1 and 2 (concatenated, projected by `fc`) together with the embedding of the next token, and
predicts the token after that over a reduced draft vocabulary. The speculative-decoding engine
chains it: each draft step feeds its own output hidden and its own predicted token back in.

Training follows EAGLE-3's "training-time test": every window is unrolled for `--ttt-steps`
draft steps exactly as inference chains them (step j at anchor row p sits at position
p + j - 1, reads token t_{p+j}, attends to the step-1 keys of rows 0..p and to its own row's
keys of steps 2..j), and each step is trained with a soft cross-entropy against the target's
next-token distribution at position p + j, renormalised over the draft vocabulary.

Data: fixed-length windows of the recipe's own training text (code files, short functions,
exercises and conversations, rendered and masked exactly as recipe.train encodes them), and
held-out windows from the files and conversations recipe.train never saw. The target runs once
per window, teacher-forced and without gradients; its layer features and its final hidden state
(which gives its logits) stay in memory for the whole run, so a window seen twice costs one
target forward, not two. Every position is trained on (--recipe-mask: only those recipe.train
trains the target on); held-out scores count only the latter, the text the target generates.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from recipe.corpus import CodeDoc, Conversation, Corpus, build_corpus
from recipe.data import Example, encode_code, encode_conversation, pack
from recipe.exercises import exercises
from recipe.train import lr_at

HERE = Path(__file__).resolve().parents[1]
DEFAULT_TARGET = HERE / "checkpoint"
AUX_LAYER_IDS = (0, 1, 2)
# <|endoftext|>, <|im_start|>, <|im_end|>: always draftable, whatever their argmax counts.
SPECIAL_IDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------
# The head


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    draft_vocab_size: int
    aux_layer_ids: tuple[int, ...] = AUX_LAYER_IDS

    @classmethod
    def from_target(cls, target_config, intermediate_size: int, draft_vocab_size: int):
        """Shapes, norm epsilon and RoPE base from the target's config (transformers 5 keeps
        the base in `rope_parameters`, older versions in `rope_theta`)."""
        rope = getattr(target_config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(target_config, "rope_theta", None))
        return cls(
            hidden_size=target_config.hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=target_config.num_attention_heads,
            num_key_value_heads=target_config.num_key_value_heads,
            head_dim=target_config.head_dim,
            rms_norm_eps=float(target_config.rms_norm_eps),
            rope_theta=float(theta),
            max_position_embeddings=target_config.max_position_embeddings,
            vocab_size=target_config.vocab_size,
            draft_vocab_size=draft_vocab_size,
        )

    def to_json(self) -> dict:
        """config.json as EAGLE-3's authors and SpecForge release it."""
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)},
        }

    @classmethod
    def from_json(cls, data: dict) -> HeadConfig:
        return cls(
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data["num_key_value_heads"],
            head_dim=data["head_dim"],
            rms_norm_eps=data["rms_norm_eps"],
            rope_theta=data["rope_theta"],
            max_position_embeddings=data["max_position_embeddings"],
            vocab_size=data["vocab_size"],
            draft_vocab_size=data["draft_vocab_size"],
            aux_layer_ids=tuple(data["eagle_config"]["eagle_aux_hidden_state_layer_ids"]),
        )


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalised in float32, cast back, then scaled."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, h, bias=False)


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Eagle3Head(nn.Module):
    """The draft head. Parameter and buffer names are the checkpoint's tensor names; the token
    embedding is the target's (frozen) and is passed in, never stored."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.aux_layer_ids) * h, h, bias=False)
        self.midlayer = MidLayer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """draft_ids: the target ids of draft ids 0..D-1, ascending."""
        self.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
        self.t2d.zero_()
        self.t2d[draft_ids] = True

    def draft_ids(self) -> torch.Tensor:
        return torch.arange(self.cfg.draft_vocab_size) + self.d2t

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Llama's rotate-half RoPE; x: [B, heads, T, hd], positions: [T]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return x * emb.cos() + rotate_half(x) * emb.sin()

    def qkv(
        self, embeds: torch.Tensor, g: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [B, nh, T, hd] and keys/values [B, nh, T, hd] (KV heads already repeated
        for GQA), with RoPE at `positions`."""
        layer, cfg = self.midlayer, self.cfg
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(g)], dim=-1)
        b, t, _ = x.shape
        q = layer.self_attn.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = layer.self_attn.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = layer.self_attn.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = self.rope(q, positions), self.rope(k, positions)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def finish(self, g: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, both residuals and the MLP: the step's output hidden (pre-norm).
        attn: [B, nh, T, hd]."""
        layer = self.midlayer
        h = g + layer.self_attn.o_proj(attn.transpose(1, 2).flatten(2))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def unroll(self, aux: torch.Tensor, embeds: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test: draft-vocabulary logits [B, T, D] of each of `steps` chained
        draft steps, for every anchor row p of a window at once.

        aux: [B, T, 3H], the target's features at positions 0..T-1.
        embeds: [B, T + steps - 1, H], the target embeddings of tokens t_1, t_2, ...: step j
        (1-based) at row p reads token t_{p+j}, i.e. embeds[:, p + j - 1].
        """
        t = aux.shape[1]
        scale = self.cfg.head_dim**-0.5
        rows = torch.arange(t)
        causal = rows[None, :] <= rows[:, None]  # step-1 keys of rows 0..p
        g = self.fc(aux)
        out: list[torch.Tensor] = []
        k1 = v1 = None
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        for j in range(1, steps + 1):
            q, k, v = self.qkv(embeds[:, j - 1 : j - 1 + t], g, rows + j - 1)
            if k1 is None:
                k1, v1 = k, v
            else:  # steps 2..j: one key per row, the row's own, at position p + i - 1
                diag_k.append(k)
                diag_v.append(v)
            scores = (q @ k1.transpose(-1, -2)) * scale
            scores = scores.masked_fill(~causal, float("-inf"))
            if diag_k:
                diag = torch.stack([(q * dk).sum(-1) for dk in diag_k], dim=-1) * scale
                scores = torch.cat([scores, diag], dim=-1)
            probs = scores.float().softmax(-1).to(q.dtype)
            attn = probs[..., :t] @ v1
            for i, dv in enumerate(diag_v):
                attn = attn + probs[..., t + i, None] * dv
            g = self.finish(g, attn)
            out.append(self.logits(g))
        return out


def init_head(cfg: HeadConfig, out_rows: torch.Tensor, seed: int) -> Eagle3Head:
    """Small seeded normal weights; lm_head starts as the target's output rows of the draft
    vocabulary (out_rows: [D, H]), so the head begins by reading the target's own output
    layer. The draft vocabulary itself is set by the caller (set_draft_vocab)."""
    head = Eagle3Head(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name.endswith("norm.weight"):
                continue  # RMSNorm scales start at one
            param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        head.lm_head.weight.copy_(out_rows)
    return head


def bf16_state_dict(head: Eagle3Head) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: floats rounded to bf16, d2t int64, t2d bool."""
    return {
        name: (t.detach().to(torch.bfloat16) if t.is_floating_point() else t.detach()).contiguous()
        for name, t in head.state_dict().items()
    }


def save_head(head: Eagle3Head, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(head.cfg.to_json(), indent=2) + "\n")
    save_file(bf16_state_dict(head), out / "model.safetensors", metadata={"format": "pt"})


def load_head(path: Path) -> Eagle3Head:
    """A saved head in float32 (the bf16 values, widened)."""
    cfg = HeadConfig.from_json(json.loads((path / "config.json").read_text()))
    head = Eagle3Head(cfg)
    tensors = load_file(path / "model.safetensors")
    head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    return head.eval()


# ---------------------------------------------------------------------------------------------
# Data


@functools.lru_cache(maxsize=2)
def corpus_for(seed: int) -> Corpus:
    """The target's corpus and split (recipe.train's, same seed); cached because tests build it
    several times in one process and it takes seconds."""
    return build_corpus(seed=seed)


def draw_windows(
    docs: Sequence, encode: Callable, count: int, length: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` packed rows of length + 1 tokens, and their recipe loss masks, from documents
    drawn at random without replacement (only as many are encoded as the rows need)."""
    pool = list(docs)
    rng.shuffle(pool)
    examples: list[Example] = []
    drawn = 0
    for doc in pool:
        if drawn > count * length:
            break
        examples.append(encode(doc))
        drawn += len(examples[-1].ids)
    ids, mask = pack(examples, length)
    if ids.shape[0] < count:
        raise ValueError(f"only {ids.shape[0]} windows of {length} tokens, {count} asked for")
    return ids[:count], mask[:count]


@dataclass
class Text:
    ids: torch.Tensor  # [N, T + 1] token windows
    mask: torch.Tensor  # [N, T + 1] recipe loss masks: ids[:, i] is a training target
    chat: torch.Tensor  # [N] bool: a conversation window (else code)


def code_and_chat_windows(
    tokenizer,
    code: Sequence[CodeDoc],
    chat: Sequence[Conversation],
    count: int,
    length: int,
    chat_share: float,
    rng: random.Random,
) -> Text:
    """Code windows and conversation windows, packed apart so that each window is one kind and
    exactly round(count * chat_share) are conversations; then shuffled together. Code is
    trained on every token, conversations on their assistant turns (recipe.data)."""
    n_chat = round(count * chat_share)
    code_ids, code_mask = draw_windows(
        code, lambda doc: encode_code(tokenizer, doc), count - n_chat, length, rng
    )
    chat_ids, chat_mask = draw_windows(
        chat, lambda conv: encode_conversation(tokenizer, conv, rng), n_chat, length, rng
    )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    return Text(
        torch.cat([code_ids, chat_ids])[order],
        torch.cat([code_mask, chat_mask])[order],
        (torch.arange(count) >= count - n_chat)[order],
    )


def train_text(
    tokenizer, corpus: Corpus, seed: int, count: int, length: int, chat_share: float
) -> Text:
    """From recipe.train's training documents: code files, short functions, exercises, chat."""
    code = [*corpus.train_code, *corpus.train_functions, *exercises(seed)]
    rng = random.Random(f"{seed}:eagle:train")
    return code_and_chat_windows(tokenizer, code, corpus.train_chat, count, length, chat_share, rng)


def heldout_text(
    tokenizer, corpus: Corpus, seed: int, count: int, length: int, chat_share: float
) -> Text:
    """From the files and conversations the target never trained on (whole files only, like
    recipe.evaluate: the functions cut out of them would repeat their text)."""
    rng = random.Random(f"{seed}:eagle:heldout")
    return code_and_chat_windows(
        tokenizer, corpus.heldout_code, corpus.heldout_chat, count, length, chat_share, rng
    )


@dataclass
class TargetPass:
    aux: torch.Tensor  # [N, T, 3H], the target's layer outputs AUX_LAYER_IDS, concatenated
    final: torch.Tensor  # [N, T, H], the target's last hidden state after its final norm
    argmax: torch.Tensor  # [N, T] int64, the target's greedy next token at each position

    def __len__(self) -> int:
        return self.argmax.shape[0]


@torch.no_grad()
def run_target(
    model,
    ids: torch.Tensor,
    aux_layers: Sequence[int],
    dtype: torch.dtype = torch.float32,
    batch: int = 16,
    desc: str = "target",
) -> TargetPass:
    """One teacher-forced forward per window (ids: [N, T + 1]; the last token is only a label),
    kept in `dtype`. hidden_states[i + 1] is decoder layer i's output (for i < num_layers - 1;
    the last entry is the final norm's output, which times the output embedding gives the
    logits: keeping it instead of [N, T, V] logits saves V / H times the memory)."""
    aux, final, argmax = [], [], []
    for start in tqdm(range(0, ids.shape[0], batch), desc=desc, unit="batch", leave=False):
        out = model(input_ids=ids[start : start + batch, :-1], output_hidden_states=True)
        aux.append(torch.cat([out.hidden_states[i + 1] for i in aux_layers], dim=-1).to(dtype))
        final.append(out.hidden_states[-1].to(dtype))
        argmax.append(out.logits.argmax(-1))
    return TargetPass(torch.cat(aux), torch.cat(final), torch.cat(argmax))


def choose_draft_vocab(
    argmax: torch.Tensor, weight: torch.Tensor, size: int, vocab: int
) -> torch.Tensor:
    """The `size` most frequent target argmax tokens where `weight` is set, plus the specials,
    as ascending target ids (ties broken by the lower id, so the choice is deterministic)."""
    counts = torch.bincount(argmax[weight], minlength=vocab).double()
    counts[list(SPECIAL_IDS)] = math.inf
    order = torch.sort(-counts, stable=True).indices
    return torch.sort(order[:size]).values


def load_target(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


@dataclass
class Windows:
    """Token windows with what the target computed on them."""

    ids: torch.Tensor  # [N, T + 1]
    weight: torch.Tensor  # [N, T] bool: the prediction at position q (of token q + 1) counts
    chat: torch.Tensor  # [N] bool: a conversation window (else code)
    target: TargetPass

    def __len__(self) -> int:
        return self.ids.shape[0]

    def take(self, idx: torch.Tensor | slice) -> Windows:
        t = self.target
        return Windows(
            self.ids[idx],
            self.weight[idx],
            self.chat[idx],
            TargetPass(t.aux[idx], t.final[idx], t.argmax[idx]),
        )


def target_windows(
    model, text: Text, weight: torch.Tensor, dtype: torch.dtype, desc: str
) -> Windows:
    return Windows(
        text.ids, weight, text.chat, run_target(model, text.ids, AUX_LAYER_IDS, dtype, desc=desc)
    )


# ---------------------------------------------------------------------------------------------
# Loss and metrics


def shifted(x: torch.Tensor, j: int, fill: float | bool = 0) -> torch.Tensor:
    """x[:, j:] padded back to its length with `fill` along dim 1."""
    pad = x.new_full((x.shape[0], j, *x.shape[2:]), fill)
    return torch.cat([x[:, j:], pad], dim=1)


def draft_embeds(embed: torch.Tensor, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Embeddings of t_1 .. t_{T + steps - 1} (ids: [B, T + 1]; rows past the end read token
    0 and are masked out by the loss)."""
    return embed[F.pad(ids[:, 1:], (0, steps - 1))]


def soft_ce(draft: torch.Tensor, target_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over counted rows of -sum_d p_target(d) log p_draft(d); a softmax over the target's
    logits of the draft vocabulary is its distribution renormalised over that vocabulary."""
    p = target_logits.float().softmax(-1)
    ce = -(p * draft.float().log_softmax(-1)).sum(-1)
    w = weight.float()
    return (ce * w).sum() / w.sum().clamp(min=1)


def batch_loss(
    head: Eagle3Head, embed: torch.Tensor, out_rows: torch.Tensor, batch: Windows, steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per draft step j: the soft cross-entropy, a bool [B, T] of draft argmax == target argmax,
    and the bool [B, T] of rows that count: step j at row p is scored against the target at
    position p + j, which must lie inside the window and have its weight set.

    out_rows: [D, H], the target's output embedding rows of the draft vocabulary."""
    tp = batch.target
    with torch.autocast("cpu", enabled=False):  # the teacher's logits stay fp32 under --bf16
        target_logits = tp.final.float() @ out_rows.T  # [B, T, D]
    drafts = head.unroll(tp.aux.float(), draft_embeds(embed, batch.ids, steps), steps)
    draft_ids = head.draft_ids()
    losses, hits, counted = [], [], []
    for j, draft in enumerate(drafts, start=1):
        w = shifted(batch.weight, j, False)
        losses.append(soft_ce(draft, shifted(target_logits, j), w))
        hits.append(draft_ids[draft.argmax(-1)] == shifted(tp.argmax, j))
        counted.append(w)
    return losses, hits, counted


@torch.no_grad()
def evaluate(
    head: Eagle3Head,
    embed: torch.Tensor,
    out_rows: torch.Tensor,
    data: Windows,
    steps: int,
    batch: int = 16,
) -> dict:
    """Per draft step: soft CE and top-1 accuracy (draft argmax == target argmax) over counted
    rows; and `chain`: the share of rows (counted at every step) whose first j drafts all match,
    so sum(chain) estimates the drafts accepted per round under greedy verification."""
    was_training = head.training
    head.eval()
    ce_sum, hit_sum, count, chain_sum = [0.0] * steps, [0] * steps, [0] * steps, [0] * steps
    chain_rows = 0
    for start in range(0, len(data), batch):
        losses, hits, counted = batch_loss(
            head, embed, out_rows, data.take(slice(start, start + batch)), steps
        )
        every = torch.stack(counted).all(0)
        chain = torch.ones_like(every)
        chain_rows += int(every.sum())
        for j in range(steps):
            n = int(counted[j].sum())
            ce_sum[j] += float(losses[j]) * n
            hit_sum[j] += int((hits[j] & counted[j]).sum())
            count[j] += n
            chain &= hits[j]
            chain_sum[j] += int((chain & every).sum())
    head.train(was_training)
    return {
        "rows": count,
        "soft_ce": [round(c / max(n, 1), 5) for c, n in zip(ce_sum, count, strict=True)],
        "top1": [round(h / max(n, 1), 5) for h, n in zip(hit_sum, count, strict=True)],
        "chain": [round(c / max(chain_rows, 1), 5) for c in chain_sum],
    }


def evaluate_by_kind(
    head: Eagle3Head, embed: torch.Tensor, out_rows: torch.Tensor, data: Windows, steps: int
) -> dict:
    """evaluate() over all windows, and under "code" and "chat" over each kind alone."""
    result = evaluate(head, embed, out_rows, data, steps)
    for kind, chat in (("code", False), ("chat", True)):
        result[kind] = evaluate(head, embed, out_rows, data.take(data.chat == chat), steps)
    return result


# ---------------------------------------------------------------------------------------------
# Training


def train(args: argparse.Namespace) -> dict:
    """Build the data, train, save (if --out) and return the run's record (recipe.json)."""
    return reproducibly(_train, args)


def reproducibly(body: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    """body(args) with deterministic algorithms and `args.threads` threads (recipe/mtp.py
    trains this way too)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    try:
        return body(args)
    finally:  # callers in the same process (tests) keep their own settings
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def batch_indices(count: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` batches of window indices: a seeded shuffle, taken in order, reshuffled when
    fewer than a batch remain (recipe/mtp.py draws its batches the same way)."""
    order = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(count, generator=order), 0
    for _ in range(steps):
        if cursor + batch_size > len(perm):  # next epoch, new order
            perm, cursor = torch.randperm(count, generator=order), 0
        yield perm[cursor : cursor + batch_size]
        cursor += batch_size


def _train(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_target(args.target)
    embed = model.get_input_embeddings().weight.detach()
    corpus = corpus_for(args.seed)
    shape = (args.window, args.chat_share)
    train_data = train_text(tokenizer, corpus, args.seed, args.train_windows, *shape)
    held_data = heldout_text(tokenizer, corpus, args.seed, args.heldout_windows, *shape)
    t_data = time.perf_counter()

    # By default every position is trained on, the prompts of conversations too: the rows are
    # computed anyway, and the extra signal helps the later draft steps most. The draft
    # vocabulary and the held-out scores use the positions the target learned to generate.
    generated = train_data.mask[:, 1:]
    train_w = generated if args.recipe_mask else torch.ones_like(generated)
    # Training features in float16 halve their memory (the residual stream here stays below
    # 100, well inside its range); held-out ones stay float32, as the engine computes them.
    train = target_windows(model, train_data, train_w, torch.float16, "target (train)")
    held = target_windows(model, held_data, held_data.mask[:, 1:], torch.float32, "target (held)")
    vocab = model.config.vocab_size
    draft_ids = choose_draft_vocab(train.target.argmax, generated, args.draft_vocab, vocab)
    out_rows = model.get_output_embeddings().weight.detach()[draft_ids]
    coverage = float(torch.isin(held.target.argmax[held.weight], draft_ids).float().mean())
    t_target = time.perf_counter()
    print(
        f"{len(train)} train / {len(held)} held-out windows of {args.window} tokens; "
        f"draft vocab {len(draft_ids)} covers {coverage:.4f} of held-out target argmaxes"
    )

    cfg = HeadConfig.from_target(model.config, args.intermediate_size, args.draft_vocab)
    head = init_head(cfg, out_rows, args.seed).train()
    head.set_draft_vocab(draft_ids)
    decay = [p for p in head.parameters() if p.dim() >= 2]
    keep = [p for p in head.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": keep, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    step_weights = [args.step_decay**j for j in range(args.ttt_steps)]
    log: list[dict] = []
    loss_log = args.loss_log or (args.out / "training_log.jsonl" if args.out else None)
    if loss_log:
        loss_log.parent.mkdir(parents=True, exist_ok=True)
        loss_log.write_text("")  # one run per log
    batches = batch_indices(len(train), args.batch_size, args.steps, args.seed)
    bar = tqdm(batches, total=args.steps, desc="training", unit="step")
    for step, idx in enumerate(bar):
        batch = train.take(idx)
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            losses, hits, counted = batch_loss(head, embed, out_rows, batch, args.ttt_steps)
        total = sum(w * loss for w, loss in zip(step_weights, losses, strict=True))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{losses[0].item():.3f}")
        last = step == args.steps - 1
        if step % args.log_every == 0 or last:
            entry = {
                "step": step,
                "loss": round(total.item(), 5),
                "step_losses": [round(loss.item(), 5) for loss in losses],
                "step_top1": [
                    round(float((h & c).sum() / c.sum().clamp(min=1)), 4)
                    for h, c in zip(hits, counted, strict=True)
                ],
                "lr": lr,
                "seconds": round(time.perf_counter() - t_target, 1),
            }
            if args.eval_every and (step % args.eval_every == 0 or last):
                held_eval = evaluate(head, embed, out_rows, held, args.ttt_steps)
                entry["heldout_top1"] = held_eval["top1"]
            log.append(entry)
            if loss_log:
                with open(loss_log, "a") as f:
                    f.write(json.dumps(entry) + "\n")
    t_train = time.perf_counter()

    fp32_eval = evaluate(head, embed, out_rows, held, args.ttt_steps)
    # The record is of the head as saved: bf16 weights, widened again.
    if args.out:
        save_head(head, args.out)
        saved = load_head(args.out)
    else:
        saved = Eagle3Head(cfg)
        saved.load_state_dict(bf16_state_dict(head))
    saved_eval = evaluate_by_kind(saved, embed, out_rows, held, args.ttt_steps)
    record = {
        "command": "python -m recipe.eagle " + " ".join(args.argv),
        "args": {k: shown_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seed": args.seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": {
            "window": args.window,
            "train_windows": len(train),
            "heldout_windows": len(held),
            "train_tokens": int(train.ids[:, :-1].numel()),
            "train_chat_windows": int(train.chat.sum()),
            "heldout_chat_windows": int(held.chat.sum()),
            "train_scored_positions": int(train.weight.sum()),
            "heldout_scored_positions": int(held.weight.sum()),
            "chat_share": args.chat_share,
            "draft_vocab_size": len(draft_ids),
            "heldout_draft_vocab_coverage": round(coverage, 5),
        },
        "final_train_step_losses": log[-1]["step_losses"],
        "heldout": saved_eval,
        "heldout_before_bf16": fp32_eval,
        "seconds": {
            "data": round(t_data - t0, 1),
            "target_forward": round(t_target - t_data, 1),
            "training": round(t_train - t_target, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    if args.out:
        (args.out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        "held-out top-1 per draft step: "
        + ", ".join(f"{a:.4f}" for a in saved_eval["top1"])
        + f"; all of the first j right: {saved_eval['chain']}"
    )
    return record


def shown_path(path: Path) -> str:
    """Relative to this example's folder where possible: the record should not name the
    machine it ran on."""
    try:
        return path.resolve().relative_to(HERE).as_posix()
    except ValueError:
        return str(path)


@torch.no_grad()
def evaluate_saved(path: Path, target: Path = DEFAULT_TARGET, by_kind: bool = False) -> dict:
    """Re-measure a saved head on the held-out windows its recipe.json describes (the "heldout"
    entry; with by_kind, also its "code" and "chat" parts)."""
    recipe = json.loads((path / "recipe.json").read_text())
    data, args = recipe["data"], recipe["args"]
    model, tokenizer = load_target(target)
    embed = model.get_input_embeddings().weight.detach()
    head = load_head(path)
    text = heldout_text(
        tokenizer,
        corpus_for(recipe["seed"]),
        recipe["seed"],
        data["heldout_windows"],
        data["window"],
        data["chat_share"],
    )
    held = target_windows(model, text, text.mask[:, 1:], torch.float32, "target (held)")
    out_rows = model.get_output_embeddings().weight.detach()[head.draft_ids()]
    measure = evaluate_by_kind if by_kind else evaluate
    return measure(head, embed, out_rows, held, args["ttt_steps"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory to write the head to")
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    parser.add_argument("--steps", type=int, default=720)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per step")
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--train-windows", type=int, default=1536)
    parser.add_argument("--heldout-windows", type=int, default=96)
    parser.add_argument(
        "--chat-share", type=float, default=0.5, help="share of the windows cut from conversations"
    )
    parser.add_argument("--draft-vocab", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--ttt-steps", type=int, default=3, help="draft steps unrolled in training")
    parser.add_argument(
        "--step-decay", type=float, default=0.8, help="loss weight of step j is decay**(j-1)"
    )
    parser.add_argument(
        "--recipe-mask",
        action="store_true",
        help="train only where recipe.train trains the target (not on conversation prompts)",
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train with bf16 matmuls (CPU autocast; weights, optimizer and evaluation stay "
        "fp32): a third less time per step, same held-out accuracy per step",
    )
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--eval-every", type=int, default=240, help="held-out top-1 in the log (0: only at the end)"
    )
    parser.add_argument("--loss-log", type=Path, help="default: OUT/training_log.jsonl")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
