"""Held-out perplexity vs a unigram baseline, and greedy answers to the model card's prompts.

    python -m recipe.evaluate checkpoint [--json eval.json]      # from examples/bisllm-tiny-moe/

The held-out set is the part of the corpus the training run never saw (files picked by a hash
of their path, and the conversations derived from them), encoded exactly like the training
data: code on every token, conversations on the assistant turns. Code is scored as whole files
(the short functions cut out of them would count the same text twice). The unigram baseline uses
token frequencies of the training set under the same tokenizer (add-one smoothed), so the two
perplexities are per token of the same text.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from recipe.corpus import TOOLS, build_corpus
from recipe.data import Example, encode_all

# Two code completions and three chat prompts (one with a tool, one asking for JSON).
PROMPTS: list[dict] = [
    {
        "kind": "code",
        "prompt": 'def is_palindrome(text):\n    """Return True if text reads the same backwards."""\n',
    },
    {"kind": "code", "prompt": "import os\n\n\ndef list_python_files(directory):\n"},
    {"kind": "chat", "messages": [{"role": "user", "content": "What does `json.dumps` do?"}]},
    {
        "kind": "chat",
        "messages": [
            {"role": "system", "content": "Answer with a single JSON object and nothing else."},
            {
                "role": "user",
                "content": "Describe `os.path.join` as JSON with keys name, module, kind and summary.",
            },
        ],
    },
    {
        "kind": "chat",
        "messages": [
            {"role": "user", "content": "What is the greatest common divisor of 84 and 36?"}
        ],
        "tools": [next(t for t in TOOLS if t.name == "gcd").spec()],
    },
]


def prompt_text(tokenizer, item: dict) -> str:
    if item["kind"] == "code":
        return item["prompt"]
    return tokenizer.apply_chat_template(
        item["messages"], tools=item.get("tools"), tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def model_nll(model, examples: list[Example], max_len: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the examples' target tokens, and their count.
    Each example is scored on its own, in windows of max_len tokens."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor(ex.ids)
        mask = torch.tensor(ex.mask)
        for start in range(0, len(ids) - 1, max_len):
            window = ids[start : start + max_len + 1]
            targets_mask = mask[start + 1 : start + max_len + 1]
            if len(window) < 2 or not targets_mask.any():
                continue
            logits = model(input_ids=window[None, :-1]).logits[0].float()
            ce = F.cross_entropy(logits, window[1:], reduction="none")
            total += float((ce * targets_mask).sum())
            count += int(targets_mask.sum())
    return total, count


def unigram_nll(train: list[Example], heldout: list[Example], vocab: int) -> tuple[float, int]:
    counts = Counter(t for ex in train for t, m in zip(ex.ids, ex.mask, strict=True) if m)
    denom = sum(counts.values()) + vocab
    total, count = 0.0, 0
    for ex in heldout:
        for i in range(1, len(ex.ids)):
            if ex.mask[i]:
                total -= math.log((counts[ex.ids[i]] + 1) / denom)
                count += 1
    return total, count


def perplexities(checkpoint: Path, max_heldout_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = json.loads((checkpoint / "recipe.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # The training run's seed: the same corpus, split and think-block coin flips.
    seed = recipe["seed"]
    corpus = build_corpus(seed=seed)
    train_code = [*corpus.train_code, *corpus.train_functions]
    train = encode_all(tokenizer, train_code, corpus.train_chat, seed)
    heldout = encode_all(tokenizer, corpus.heldout_code, corpus.heldout_chat, seed)
    kept, budget = [], max_heldout_tokens
    for ex in heldout:  # already shuffled: a prefix is a fair sample
        if budget <= 0:
            break
        kept.append(ex)
        budget -= len(ex.ids)
    result = {}
    for name, pick in (("code", lambda ex: ex.mask[0]), ("chat", lambda ex: not ex.mask[0])):
        subset = [ex for ex in kept if pick(ex)]
        m_total, m_count = model_nll(model, subset, max_len=512)
        u_total, u_count = unigram_nll(train, subset, len(tokenizer))
        assert m_count == u_count
        result[name] = {
            "tokens": m_count,
            "model_ppl": round(math.exp(m_total / m_count), 3),
            "unigram_ppl": round(math.exp(u_total / u_count), 3),
        }
    return result


def greedy_answers(checkpoint: Path, max_tokens: int = 96) -> list[dict]:
    from bisllm_server.engine.config import EngineConfig
    from bisllm_server.engine.engine import LLMEngine
    from bisllm_server.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(model=checkpoint, dtype="float32"))
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    prompts = [prompt_text(engine.tokenizer, item) for item in PROMPTS]
    outputs = engine.generate(prompts, params)
    return [
        {"prompt": prompt, "output": out.text, "finish_reason": out.finish_reason}
        for prompt, out in zip(prompts, outputs, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--max-heldout-tokens", type=int, default=200_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {
        "perplexity": perplexities(args.checkpoint, args.max_heldout_tokens),
        "answers": greedy_answers(args.checkpoint),
    }
    for name, row in report["perplexity"].items():
        print(f"{name}: model ppl {row['model_ppl']}, unigram ppl {row['unigram_ppl']}")
    for answer in report["answers"]:
        print("-" * 60 + f"\n{answer['prompt']}\x1b[1m{answer['output']}\x1b[0m")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
