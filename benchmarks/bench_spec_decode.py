"""Speculative decoding on the embedded model: output tokens/s and tokens per target forward,
with and without drafts (NGram, the trained EAGLE-3 head, MTP), at batch 1 and 8.

    .venv/bin/python benchmarks/bench_spec_decode.py [--methods ngram,eagle,mtp] [--repeats 5]
        [--draft 6] [--model-draft 3] [--mtp-model DIR] [--json FILE]

MTP runs on the embedded model plus its trained NextN layer (examples/bisllm-tiny-moe/mtp,
assembled into a temporary checkpoint), or on `--mtp-model`; its baseline is the same
checkpoint without speculation.

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
import sys
import tempfile
import time
from pathlib import Path

import torch

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
EAGLE_HEAD = REPO / "examples" / "bisllm-tiny-moe" / "eagle3"
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


def engine_config(method: str | None, args: argparse.Namespace) -> EngineConfig:
    if method == "mtp":
        return EngineConfig(
            model=args.mtp_model, speculative_method=method, num_draft_tokens=args.model_draft
        )
    model = args.mtp_model if method == "mtp-off" else CHECKPOINT
    if method == "eagle":
        return EngineConfig(
            model=model,
            speculative_method="eagle",
            speculative_model=EAGLE_HEAD,
            num_draft_tokens=args.model_draft,
        )
    spec = method if method == "ngram" else None
    return EngineConfig(model=model, speculative_method=spec, num_draft_tokens=args.draft)


def measure(prompt: str, batch: int, method: str | None, args: argparse.Namespace) -> dict:
    engine = LLMEngine(engine_config(method, args))
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
    parser.add_argument(
        "--methods", default="ngram,eagle,mtp", help="comma-separated: ngram,eagle,mtp"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft", type=int, default=6, help="NGram's num_draft_tokens")
    parser.add_argument("--model-draft", type=int, default=3, help="EAGLE / MTP draft length")
    parser.add_argument("--mtp-model", type=Path, default=None, help="checkpoint with NextN layers")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if "mtp" in methods and args.mtp_model is None:
        sys.path.insert(0, str(CHECKPOINT.parent))
        from recipe.mtp import assemble_checkpoint

        args.mtp_model = assemble_checkpoint(Path(tempfile.mkdtemp()) / "tiny-moe-mtp")
    print(
        f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"NGram up to {args.draft} drafts, EAGLE/MTP {args.model_draft}; "
        f"median of {args.repeats}\n"
    )
    print(
        "| method | workload | batch | tokens/s off | tokens/s on | ratio "
        "| tokens per forward | accepted |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    results = []
    for method in methods:
        baseline = "mtp-off" if method == "mtp" else None
        for name, prompt in workloads().items():
            for batch in (1, 8):
                off = measure(prompt, batch, baseline, args)
                on = measure(prompt, batch, method, args)
                # Speculation must not change a greedy output.
                assert on["token_ids"] == off["token_ids"], f"{method} {name} {batch}: differ"
                ratio = on["tokens_per_s"] / off["tokens_per_s"]
                print(
                    f"| {method} | {name} | {batch} | {off['tokens_per_s']:.0f} "
                    f"| {on['tokens_per_s']:.0f} | {ratio:.2f}x "
                    f"| {on['tokens_per_forward']:.2f} | {on['speculation_rate']:.0%} |",
                    flush=True,
                )
                results.append(
                    {
                        "method": method,
                        "workload": name,
                        "batch": batch,
                        "off_tokens_per_s": off["tokens_per_s"],
                        "on_tokens_per_s": on["tokens_per_s"],
                        "ratio": ratio,
                        "tokens_per_forward": on["tokens_per_forward"],
                        "speculation_rate": on["speculation_rate"],
                    }
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
