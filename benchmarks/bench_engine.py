"""Engine benchmark on this CPU: offline throughput vs transformers `generate`, cached vs
uncached TTFT, and Python overhead per scheduler step.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 3] [--json results.json]

The model is a tiny random Qwen3-MoE built with transformers (8 experts, top-2), saved as an
HF checkpoint and loaded by both stacks, so both run the same weights in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams

PROMPT_LEN = 32
OUTPUT_LEN = 128
TTFT_PROMPT_LEN = 1024


# Two tiny Qwen3-MoE shapes. "qwen3-like" keeps Qwen3-30B-A3B's routing shape scaled down
# (many small experts, top-8; hidden/expert width ratio as in the real model); "few-experts" is a
# Mixtral-like 8 experts / top-2 with wider experts, where computing every expert is cheapest.
SHAPES: dict[str, dict[str, int]] = {
    "qwen3-like": dict(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=48),
    "few-experts": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128),
}


def build_tiny_qwen3_moe(path: Path, shape: str = "qwen3-like") -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **SHAPES[shape],
    )
    Qwen3MoeForCausalLM(config).eval().save_pretrained(path)
    return path


def prompts_for(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 4000, (batch, length), generator=g).tolist()


def engine_throughput(engine: LLMEngine, batch: int, seed: int) -> float:
    prompts = prompts_for(batch, PROMPT_LEN, seed)
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    engine.reset_prefix_cache()
    start = time.perf_counter()
    outs = engine.generate(prompts, params, detokenize=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == OUTPUT_LEN for o in outs)
    return batch * OUTPUT_LEN / elapsed


@torch.inference_mode()
def transformers_throughput(model, batch: int, seed: int) -> float:
    ids = torch.tensor(prompts_for(batch, PROMPT_LEN, seed))
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=OUTPUT_LEN,
        min_new_tokens=OUTPUT_LEN,
        pad_token_id=0,
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_LEN + OUTPUT_LEN
    return batch * OUTPUT_LEN / elapsed


def ttft(engine: LLMEngine, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), detokenize=False)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - start


def step_overhead(engine: LLMEngine, batch: int) -> dict[str, float]:
    """Median scheduling + batch-preparation time of decode steps, and its share of the step."""
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    for p in prompts_for(batch, PROMPT_LEN, 99):
        engine.add_request(p, params, detokenize=False)
    sched, total, python = [], [], []
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.stats
        if s.decode_tokens == batch:
            sched.append(s.schedule_seconds)
            total.append(s.step_seconds)
            python.append(s.step_seconds - s.forward_seconds)
    return {
        "step_ms": statistics.median(total) * 1e3,
        "schedule_ms": statistics.median(sched) * 1e3,
        "python_ms": statistics.median(python) * 1e3,
        "python_share": statistics.median(p / t for p, t in zip(python, total, strict=True)),
    }


def throughput_table(path: Path, batches: list[int], repeats: int) -> tuple[LLMEngine, list]:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = LLMEngine(
        EngineConfig(model=path, dtype="float32", max_batch_size=64, max_num_tokens=4096)
    )
    engine_throughput(engine, 8, seed=1234)  # warm-up both
    transformers_throughput(reference, 8, seed=1234)
    rows = []
    for batch in batches:
        # Interleave the two stacks so machine noise hits both alike.
        ours, theirs = [], []
        for r in range(repeats):
            ours.append(engine_throughput(engine, batch, seed=r))
            theirs.append(transformers_throughput(reference, batch, seed=r))
        row = {
            "batch": batch,
            "bisllm_tok_s": statistics.median(ours),
            "transformers_tok_s": statistics.median(theirs),
        }
        row["ratio"] = row["bisllm_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        print(
            f"  batch {batch:>3}: bisllm {row['bisllm_tok_s']:8.1f} tok/s   "
            f"transformers {row['transformers_tok_s']:8.1f} tok/s   ratio {row['ratio']:.2f}x"
        )
    return engine, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "throughput": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for shape in args.shapes.split(","):
            print(
                f"{shape} ({SHAPES[shape]}), {PROMPT_LEN}-token prompts, {OUTPUT_LEN} new tokens:"
            )
            path = build_tiny_qwen3_moe(Path(tmp) / shape, shape)
            engines[shape], results["throughput"][shape] = throughput_table(
                path, batches, args.repeats
            )
        engine = next(iter(engines.values()))

        prompt = prompts_for(1, TTFT_PROMPT_LEN, 7)[0]
        uncached, cached = [], []
        for _ in range(max(args.repeats, 5)):
            engine.reset_prefix_cache()
            uncached.append(ttft(engine, prompt))
            cached.append(ttft(engine, prompt))
        results["ttft"] = {
            "prompt_tokens": TTFT_PROMPT_LEN,
            "uncached_ms": statistics.median(uncached) * 1e3,
            "cached_ms": statistics.median(cached) * 1e3,
        }
        results["ttft"]["ratio"] = results["ttft"]["cached_ms"] / results["ttft"]["uncached_ms"]
        t = results["ttft"]
        print(
            f"TTFT {TTFT_PROMPT_LEN}-token prompt: uncached {t['uncached_ms']:.1f} ms, "
            f"cached {t['cached_ms']:.1f} ms ({t['ratio']:.1%})"
        )
        results["step_overhead_batch32"] = step_overhead(engine, 32)
        o = results["step_overhead_batch32"]
        print(
            f"decode step at batch 32: {o['step_ms']:.2f} ms; outside the model forward "
            f"{o['python_ms']:.3f} ms ({o['python_share']:.1%}), of which scheduling + batch "
            f"preparation {o['schedule_ms']:.3f} ms"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
