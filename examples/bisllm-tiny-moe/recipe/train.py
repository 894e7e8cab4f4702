"""Train bisllm-tiny-moe from scratch on this CPU and write the HF checkpoint.

    python -m recipe.train --out checkpoint          # from examples/bisllm-tiny-moe/

Steps, in one process and from one seed: build the corpus from the Python standard library
(recipe.corpus), train the BPE tokenizer on it, encode and pack the training set, train a
Qwen3-MoE (transformers' class) with AdamW and a cosine schedule, then save the model in bf16
with its tokenizer, chat template and generation config. A tqdm bar shows progress; every
`--log-every` steps a JSON line (step, loss, aux loss, lr, tokens, seconds) goes to the loss log.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import GenerationConfig, Qwen3MoeForCausalLM

from recipe.chat_template import END_OF_TEXT, IM_END, SPECIAL_TOKENS
from recipe.corpus import Corpus, build_corpus
from recipe.data import encode_all, pack
from recipe.exercises import exercises
from recipe.model import Shape, make_config
from recipe.tokenizer import save_tokenizer, train_tokenizer

PRESETS: dict[str, dict] = {
    # The shipped model (see the model card for its measured run).
    "default": dict(steps=1450, batch_size=16, seq_len=512, warmup=50, shape=Shape()),
    # Seconds, for tests: the same pipeline on a slice of the corpus with a toy shape.
    "smoke": dict(
        steps=6,
        warmup=1,
        batch_size=4,
        seq_len=64,
        max_code_bytes=200_000,
        max_chat=400,
        shape=Shape(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            max_position_embeddings=256,
        ),
    ),
}


def tokenizer_texts(corpus: Corpus) -> list[str]:
    """What the BPE is trained on: every training code file (not the functions cut out of
    them again), plus the chat examples flattened to their message texts (the template's markup
    is added as whole tokens anyway)."""
    texts = [doc.text for doc in corpus.train_code]
    for conv in corpus.train_chat:
        texts.append("\n".join(str(m.get("content") or "") for m in conv.messages))
        for m in conv.messages:
            for call in m.get("tool_calls") or []:
                texts.append(json.dumps(call["function"]["arguments"]))
            if m.get("reasoning_content"):
                texts.append(m["reasoning_content"])
        for tool in conv.tools or []:
            texts.append(json.dumps(tool))
    return texts


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    weights = mask.flatten().float()
    return (ce * weights).sum() / weights.sum().clamp(min=1)


def train(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    shape: Shape = preset["shape"]
    steps = args.steps or preset["steps"]
    batch_size, seq_len = preset["batch_size"], preset["seq_len"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]

    print(f"building the corpus from the Python {platform.python_version()} standard library")
    corpus = build_corpus(seed=args.seed, max_code_bytes=preset.get("max_code_bytes"))
    if preset.get("max_chat"):
        corpus = replace(corpus, train_chat=corpus.train_chat[: preset["max_chat"]])
    print(f"training the tokenizer ({shape.vocab_size} tokens)")
    tokenizer = train_tokenizer(tokenizer_texts(corpus), shape.vocab_size)
    assert len(tokenizer) == shape.vocab_size, (len(tokenizer), shape.vocab_size)
    print("encoding")
    drills = exercises(args.seed)
    code = [
        *corpus.train_code,
        *corpus.train_functions * args.function_repeats,
        *drills * args.exercise_repeats,
    ]
    examples = encode_all(tokenizer, code, corpus.train_chat, args.seed, args.chat_repeats)
    rows, masks = pack(examples, seq_len)
    print(f"{rows.shape[0]} rows of {seq_len} tokens; {steps} steps of {batch_size} rows")

    model = Qwen3MoeForCausalLM(make_config(shape)).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    order = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(rows.shape[0], generator=order)
    cursor, log = 0, []
    if args.loss_log:
        args.loss_log.write_text("")  # one run per log
    start = time.perf_counter()
    aux_coef = model.config.router_aux_loss_coef
    bar = tqdm(range(steps), desc="training", unit="step")
    for step in bar:
        if cursor + batch_size > len(perm):  # next epoch, new order
            perm, cursor = torch.randperm(rows.shape[0], generator=order), 0
        idx = perm[cursor : cursor + batch_size]
        cursor += batch_size
        batch, mask = rows[idx], masks[idx]
        lr = lr_at(step, steps, args.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        loss = masked_loss(out.logits, batch[:, 1:], mask[:, 1:])
        total = loss + aux_coef * out.aux_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.log_every == 0 or step == steps - 1:
            entry = {
                "step": step,
                "loss": round(loss.item(), 5),
                "aux_loss": round(out.aux_loss.item(), 5),
                "lr": lr,
                "tokens": (step + 1) * batch_size * seq_len,
                "seconds": round(time.perf_counter() - start, 1),
            }
            log.append(entry)
            if args.loss_log:
                with open(args.loss_log, "a") as f:
                    f.write(json.dumps(entry) + "\n")
    if args.out:
        save(model, tokenizer, args.out, corpus, args, steps, len(drills))
    return log


def save(model, tokenizer, out: Path, corpus: Corpus, args, steps: int, n_exercises: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.bfloat16).save_pretrained(out)
    save_tokenizer(tokenizer, out)
    GenerationConfig(
        eos_token_id=[SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(END_OF_TEXT)],
        pad_token_id=SPECIAL_TOKENS.index(END_OF_TEXT),
        do_sample=False,
    ).save_pretrained(out)
    recipe = {
        "command": "python -m recipe.train " + " ".join(args.argv),
        "seed": args.seed,
        "preset": args.preset,
        "steps": steps,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "stdlib_root": corpus.stdlib_root,
        "train_code_files": len(corpus.train_code),
        "heldout_code_files": len(corpus.heldout_code),
        "train_function_docs": len(corpus.train_functions),
        "exercise_docs": n_exercises,
        "train_conversations": len(corpus.train_chat),
        "heldout_conversations": len(corpus.heldout_chat),
        "shape": asdict(PRESETS[args.preset]["shape"]),
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--preset", choices=list(PRESETS), default="default")
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, help="override the preset's warmup steps")
    parser.add_argument("--chat-repeats", type=int, default=2)
    parser.add_argument(
        "--function-repeats",
        type=int,
        default=2,
        help="copies of each short function document, besides its whole file",
    )
    parser.add_argument(
        "--exercise-repeats",
        type=int,
        default=4,
        help="copies of each generated exercise function (recipe.exercises)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--loss-log", type=Path, help="write the JSON-lines loss log here")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
