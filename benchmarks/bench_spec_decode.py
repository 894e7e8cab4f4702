"""Speculative decoding on the embedded model: output tokens/s and tokens per target forward,
with and without NGram drafts, at batch 1 and 8.

    .venv/bin/python benchmarks/bench_spec_decode.py [--repeats 5] [--draft 6] [--json FILE]

Workloads (greedy, 128 output tokens, ignore_eos):
- `code-rewrite`: "rewrite this code" over a 1,200-character source file, the answer already
  begun. The model tends to copy its input, which is what NGram lookup drafts from.
- `story`: a short open-ended prompt, where the only repetition is the model's own.

Each configuration runs `--repeats` times on a fresh prefix cache (prefill included, as a user
sees it); medians are reported with the ratio to no speculation measured in the same run.
Tokens per target forward is (accepted drafts + verification passes) / verification passes:
how many tokens one forward of a speculating request yields (1.0 without speculation).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
OUTPUT_TOKENS = 128


def workloads() -> dict[str, str]:
    source = (REPO / "server" / "engine" / "speculative" / "ngram.py").read_text()[:1200]
    return {
        "code-rewrite": (
            "Rewrite this code with the same behaviour:\n"
            + source
            + "\n\nRewritten:\n"
            + source[:200]
        ),
        "story": "Once upon a time, in a small village by the sea,",
    }


def measure(prompt: str, batch: int, method: str | None, args: argparse.Namespace) -> dict:
    engine = LLMEngine(
        EngineConfig(model=CHECKPOINT, speculative_method=method, num_draft_tokens=args.draft)
    )
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    times = []
    outputs = []
    for _ in range(args.repeats):
        engine.reset_prefix_cache()
        start = time.perf_counter()
        outputs = engine.generate([prompt] * batch, params)
        times.append(time.perf_counter() - start)
    tokens = sum(len(o.token_ids) for o in outputs)
    s = engine.stats
    verified = s.spec_verify_steps_total
    return {
        "tokens_per_s": tokens / statistics.median(times),
        "tokens_per_forward": (s.spec_accepted_tokens_total + verified) / verified
        if verified
        else 1.0,
        "speculation_rate": s.speculation_rate,
        "token_ids": [o.token_ids for o in outputs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft", type=int, default=6, help="num_draft_tokens (max_draft_len)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    print(
        f"embedded model on {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; NGram with up to {args.draft} drafts; "
        f"median of {args.repeats}\n"
    )
    print(
        "| workload | batch | tokens/s off | tokens/s NGram | ratio | tokens per forward | accepted |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = []
    for name, prompt in workloads().items():
        for batch in (1, 8):
            off = measure(prompt, batch, None, args)
            on = measure(prompt, batch, "ngram", args)
            # Speculation must not change a greedy output.
            assert on["token_ids"] == off["token_ids"], f"{name} batch {batch}: outputs differ"
            ratio = on["tokens_per_s"] / off["tokens_per_s"]
            print(
                f"| {name} | {batch} | {off['tokens_per_s']:.0f} | {on['tokens_per_s']:.0f} "
                f"| {ratio:.2f}x | {on['tokens_per_forward']:.2f} "
                f"| {on['speculation_rate']:.0%} |"
            )
            results.append(
                {
                    "workload": name,
                    "batch": batch,
                    "off_tokens_per_s": off["tokens_per_s"],
                    "ngram_tokens_per_s": on["tokens_per_s"],
                    "ratio": ratio,
                    "tokens_per_forward": on["tokens_per_forward"],
                    "speculation_rate": on["speculation_rate"],
                }
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
