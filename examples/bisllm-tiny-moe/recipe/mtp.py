"""Fit a multi-token-prediction (NextN) layer to the embedded model, for MTP speculation.

DeepSeek-V3 and GLM-4.5 ship one such layer after their last decoder layer; the embedded
Qwen3-MoE was trained without one, so this recipe distils one from it, the way EAGLE heads are
fitted (recipe/eagle.py, whose data and target pass it reuses). The layer is stored in
DeepSeek-V3's layout as the tensors `model.layers.{L}.*` (L = the target's layer count):

  enorm, hnorm            RMSNorms of the next token's embedding and of the hidden state
  eh_proj                 [H, 2H] over [enorm(embed), hnorm(h)], embedding first
  input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, post_attention_layernorm,
  mlp.gate, mlp.experts.E.{gate,up,down}_proj
                          one Qwen3-MoE decoder layer, like the target's own
  shared_head.norm        the norm before the shared (tied) output head

At position p it reads the target's final hidden state h_p (after its last norm) and token
t_{p+1}, and predicts t_{p+2}. Chained drafting feeds its own output (before shared_head.norm)
back as h; training unrolls exactly that ("training-time test", as in recipe/eagle.py).

    cd examples/bisllm-tiny-moe && ../../.venv/bin/python -m recipe.mtp --out mtp
    ../../.venv/bin/python -m recipe.mtp --assemble /tmp/tiny-moe-mtp   # a checkpoint with it

`assemble_checkpoint` builds a checkpoint directory that the engine loads with the layer:
the target's files, config.json with `num_nextn_predict_layers: 1`, and two weight shards (links
to checkpoint/model.safetensors and mtp/model.safetensors) under a shard index.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from recipe.eagle import (
    DEFAULT_TARGET,
    HERE,
    RMSNorm,
    Windows,
    batch_indices,
    corpus_for,
    draft_embeds,
    heldout_text,
    load_target,
    reproducibly,
    rotate_half,
    shifted,
    shown_path,
    soft_ce,
    target_windows,
    train_text,
)
from recipe.train import lr_at

DEFAULT_OUT = HERE / "mtp"


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoe(nn.Module):
    """Softmax router, top-k renormalised, like the target's layers; each expert runs on the
    tokens routed to it."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = self.gate(flat).float().softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        top = (top / top.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, expert(flat[token]) * top[token, slot, None])
        return out.view(shape)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)


class SharedHead(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps)


class MtpLayer(nn.Module):
    """Parameter names are the checkpoint's, after `model.layers.{L}.`."""

    def __init__(self, target_config) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        c = target_config
        h, eps = c.hidden_size, c.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = SelfAttention(h, self.heads, self.kv_heads, self.head_dim, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = SparseMoe(h, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok)
        self.shared_head = SharedHead(h, eps)
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        inv_freq = 1.0 / theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return x * emb.cos() + rotate_half(x) * emb.sin()

    def qkv(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, heads, T, hd] each, KV heads repeated for GQA; QK-norm then RoPE (Qwen3)."""
        b, t, _ = x.shape
        attn = self.self_attn
        q = attn.q_norm(attn.q_proj(x).view(b, t, self.heads, self.head_dim))
        k = attn.k_norm(attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim))
        v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = self.rope(q, positions), self.rope(k, positions)
        groups = self.heads // self.kv_heads
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def unroll(
        self, final: torch.Tensor, embeds: torch.Tensor, head: torch.Tensor, steps: int
    ) -> list[torch.Tensor]:
        """Logits [B, T, V] of `steps` chained draft steps for every anchor row at once.

        final: [B, T, H], the target's final hidden states; embeds: [B, T + steps - 1, H] of
        t_1, t_2, ...; head: [V, H], the target's output embedding. Step j at row p sits at
        position p + j - 1, reads token t_{p+j} and the previous step's output (the target's
        h_p for j = 1), and attends to step 1's keys of rows 0..p plus its own row's keys of
        steps 2..j: what chained drafting at inference sees."""
        t = final.shape[1]
        scale = self.head_dim**-0.5
        rows = torch.arange(t)
        causal = rows[None, :] <= rows[:, None]
        prev = final
        out: list[torch.Tensor] = []
        k1 = v1 = None
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        for j in range(1, steps + 1):
            e = embeds[:, j - 1 : j - 1 + t]
            x_in = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(prev)], dim=-1))
            q, k, v = self.qkv(self.input_layernorm(x_in), rows + j - 1)
            if k1 is None:
                k1, v1 = k, v
            else:
                diag_k.append(k)
                diag_v.append(v)
            scores = ((q @ k1.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf"))
            if diag_k:
                diag = torch.stack([(q * dk).sum(-1) for dk in diag_k], dim=-1) * scale
                scores = torch.cat([scores, diag], dim=-1)
            probs = scores.float().softmax(-1).to(q.dtype)
            attn = probs[..., :t] @ v1
            for i, dv in enumerate(diag_v):
                attn = attn + probs[..., t + i, None] * dv
            x = x_in + self.self_attn.o_proj(attn.transpose(1, 2).flatten(2))
            x = x + self.mlp(self.post_attention_layernorm(x))
            out.append(self.shared_head.norm(x) @ head.T)
            prev = x
        return out


def init_layer(target_config, target_dir: Path, seed: int) -> MtpLayer:  # type: ignore[no-untyped-def]
    """The block starts as a copy of the target's last decoder layer and shared_head.norm as
    its final norm; eh_proj passes the hidden state through plus a little of the embedding."""
    layer = MtpLayer(target_config)
    last = target_config.num_hidden_layers - 1
    prefix = f"model.layers.{last}."
    own = dict(layer.named_parameters())
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as f, torch.no_grad():
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            if name.startswith(prefix) and name[len(prefix) :] in own:
                own[name[len(prefix) :]].copy_(f.get_tensor(name).float())
        layer.shared_head.norm.weight.copy_(f.get_tensor("model.norm.weight").float())
        h = target_config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        layer.eh_proj.weight.copy_(
            torch.cat([torch.randn(h, h, generator=gen) * 0.02, torch.eye(h)], dim=1)
        )
    return layer


def checkpoint_tensors(layer: MtpLayer, num_layers: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{num_layers}."
    return {
        prefix + name: t.detach().to(torch.bfloat16).contiguous()
        for name, t in layer.state_dict().items()
    }


def load_layer(path: Path, target_config) -> MtpLayer:  # type: ignore[no-untyped-def]
    """A saved layer in float32 (its bf16 values widened)."""
    layer = MtpLayer(target_config)
    prefix = f"model.layers.{target_config.num_hidden_layers}."
    tensors = load_file(path / "model.safetensors")
    layer.load_state_dict({k.removeprefix(prefix): v.float() for k, v in tensors.items()})
    return layer.eval()


def batch_loss(
    layer: MtpLayer, embed: torch.Tensor, batch: Windows, steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per step j: soft cross-entropy against the target's distribution at p + j, draft argmax
    == target argmax, and the rows that count (inside the window and trained on)."""
    tp = batch.target
    drafts = layer.unroll(tp.final.float(), draft_embeds(embed, batch.ids, steps), embed, steps)
    target_logits = tp.final.float() @ embed.T
    losses, hits, counted = [], [], []
    for j, draft in enumerate(drafts, start=1):
        w = shifted(batch.weight, j, False)
        losses.append(soft_ce(draft, shifted(target_logits, j), w))
        hits.append(draft.argmax(-1) == shifted(tp.argmax, j))
        counted.append(w)
    return losses, hits, counted


@torch.no_grad()
def evaluate(layer: MtpLayer, embed: torch.Tensor, data: Windows, steps: int) -> dict:
    """Top-1 per draft step and `chain`: the share of rows whose first j drafts all match."""
    hit_sum, count, chain_sum, chain_rows = [0] * steps, [0] * steps, [0] * steps, 0
    for start in range(0, len(data), 16):
        _, hits, counted = batch_loss(layer, embed, data.take(slice(start, start + 16)), steps)
        every = torch.stack(counted).all(0)
        chain = torch.ones_like(every)
        chain_rows += int(every.sum())
        for j in range(steps):
            hit_sum[j] += int((hits[j] & counted[j]).sum())
            count[j] += int(counted[j].sum())
            chain &= hits[j]
            chain_sum[j] += int((chain & every).sum())
    return {
        "top1": [round(h / max(n, 1), 5) for h, n in zip(hit_sum, count, strict=True)],
        "chain": [round(c / max(chain_rows, 1), 5) for c in chain_sum],
    }


def train(args: argparse.Namespace) -> dict:
    """Build the data, train, save (if --out) and return the run's record (recipe.json)."""
    return reproducibly(_train, args)


def _train(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model, tokenizer = load_target(args.target)
    embed = model.get_input_embeddings().weight.detach()
    corpus = corpus_for(args.seed)
    shape = (args.window, args.chat_share)
    train_data = train_text(tokenizer, corpus, args.seed, args.train_windows, *shape)
    held_data = heldout_text(tokenizer, corpus, args.seed, args.heldout_windows, *shape)
    weight = torch.ones_like(train_data.mask[:, 1:])
    train = target_windows(model, train_data, weight, torch.float16, "target (train)")
    held = target_windows(model, held_data, held_data.mask[:, 1:], torch.float32, "target (held)")
    t_target = time.perf_counter()

    layer = init_layer(model.config, args.target, args.seed).train()
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in layer.parameters() if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in layer.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    step_weights = [args.step_decay**j for j in range(args.ttt_steps)]
    log: list[dict] = []
    loss_log = args.out / "training_log.jsonl" if args.out else None
    if loss_log:
        loss_log.parent.mkdir(parents=True, exist_ok=True)
        loss_log.write_text("")
    batches = batch_indices(len(train), args.batch_size, args.steps, args.seed)
    bar = tqdm(batches, total=args.steps, desc="training", unit="step")
    for step, idx in enumerate(bar):
        batch = train.take(idx)
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses, _, _ = batch_loss(layer, embed, batch, args.ttt_steps)
        total = sum(w * loss for w, loss in zip(step_weights, losses, strict=True))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{losses[0].item():.3f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            entry = {
                "step": step,
                "loss": round(total.item(), 5),
                "step_losses": [round(loss.item(), 5) for loss in losses],
                "lr": lr,
            }
            log.append(entry)
            if loss_log:
                with open(loss_log, "a") as f:
                    f.write(json.dumps(entry) + "\n")
    t_train = time.perf_counter()

    num_layers = model.config.num_hidden_layers
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tensors = checkpoint_tensors(layer, num_layers)
        save_file(tensors, args.out / "model.safetensors", metadata={"format": "pt"})
        layer = load_layer(args.out, model.config)  # scored as saved: bf16, widened
    heldout = evaluate(layer.eval(), embed, held, args.ttt_steps)
    record = {
        "command": "python -m recipe.mtp " + " ".join(args.argv),
        "args": {k: shown_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "data": {
            "window": args.window,
            "train_windows": len(train),
            "heldout_windows": len(held),
            "chat_share": args.chat_share,
        },
        "final_train_step_losses": log[-1]["step_losses"],
        "heldout": heldout,
        "seconds": {
            "target_forward": round(t_target - t0, 1),
            "training": round(t_train - t_target, 1),
        },
    }
    if args.out:
        (args.out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"held-out top-1 per draft step: {heldout['top1']}; chain: {heldout['chain']}")
    return record


def assemble_checkpoint(
    dst: Path, mtp_dir: Path = DEFAULT_OUT, target: Path = DEFAULT_TARGET
) -> Path:
    """A checkpoint directory of the target plus the MTP layer: links to the target's files,
    its config with `num_nextn_predict_layers: 1`, and a shard index over both weight files."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in target.iterdir():
        if item.name not in ("config.json", "model.safetensors"):
            shutil.copy2(item, dst / item.name)
    config = json.loads((target / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight_map = {}
    # Shard names, not model.safetensors: a loader reading that single file would miss the layer.
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for shard, source in zip(shards, (target, mtp_dir), strict=True):
        link = dst / shard
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((source / "model.safetensors").resolve())
        with safe_open(str(link), framework="pt") as f:
            weight_map |= {name: shard for name in f.keys()}  # noqa: SIM118
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory to write the layer to")
    parser.add_argument("--assemble", type=Path, help="only build a checkpoint with the layer")
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--train-windows", type=int, default=1024)
    parser.add_argument("--heldout-windows", type=int, default=64)
    parser.add_argument("--chat-share", type=float, default=0.5)
    parser.add_argument("--ttt-steps", type=int, default=3)
    parser.add_argument("--step-decay", type=float, default=0.8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.assemble:
        print(assemble_checkpoint(args.assemble))
        return
    train(args)


if __name__ == "__main__":
    main()
