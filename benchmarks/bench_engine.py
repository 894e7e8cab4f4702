"""Engine benchmark on this CPU: offline throughput vs transformers `generate`, cached vs
uncached TTFT, and Python overhead per scheduler step.

    .venv/bin/python benchmarks/bench_engine.py [--repeats 3] [--json results.json]
    python benchmarks/bench_engine.py --device cuda --dtype bfloat16   # on a GPU machine

Models: tiny random Qwen3-MoE checkpoints built with transformers (see SHAPES), loaded by both
stacks, so both run the same weights in the same dtype (fp32 by default) on the same requests (see WORKLOADS). Throughput
counts only the tokens each request asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
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


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.output_lens)


def uniform_workload(batch: int, seed: int) -> Workload:
    """Equal prompts and outputs: `generate`'s best case (no padding, nobody finishes early)."""
    return Workload(prompts_for(batch, PROMPT_LEN, seed), [OUTPUT_LEN] * batch)


def mixed_workload(batch: int, seed: int) -> Workload:
    """Prompt and output lengths spread over 16-256 tokens, as in real traffic."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(16, 257, (batch,), generator=g).tolist()
    output_lens = torch.randint(16, 257, (batch,), generator=g).tolist()
    prompts = [torch.randint(1, 4000, (n,), generator=g).tolist() for n in prompt_lens]
    return Workload(prompts, output_lens)


WORKLOADS = {"uniform": uniform_workload, "mixed": mixed_workload}


def engine_throughput(engine: LLMEngine, work: Workload) -> float:
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in work.output_lens
    ]
    engine.reset_prefix_cache()
    start = time.perf_counter()
    outs = engine.generate(work.prompts, params, detokenize=False)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == work.output_lens
    return work.useful_tokens / elapsed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def transformers_throughput(model, work: Workload) -> float:
    """One `generate` call: prompts left-padded to the longest, every sequence decoded to the
    longest requested output (it cannot stop one row early); only requested tokens count."""
    width = max(map(len, work.prompts))
    ids = torch.zeros(len(work.prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(work.prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    new_tokens = max(work.output_lens)
    ids, mask = ids.to(model.device), mask.to(model.device)
    synchronize(model.device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
    )
    synchronize(model.device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new_tokens
    return work.useful_tokens / elapsed


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


def throughput_table(
    path: Path,
    batches: list[int],
    repeats: int,
    workloads: list[str],
    device: str,
    dtype: str,
    cpu_kernels: bool = True,
) -> tuple[LLMEngine, list]:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    reference = reference.to(device).eval()
    engine = LLMEngine(
        EngineConfig(
            model=path,
            dtype=dtype,
            device=device,
            max_batch_size=64,
            max_num_tokens=4096,
            num_kv_pages=4096,  # 64 sequences of up to 1024 tokens, whatever the device
            cpu_kernels=cpu_kernels,
        )
    )
    engine_throughput(engine, uniform_workload(8, seed=1234))  # warm-up both
    transformers_throughput(reference, uniform_workload(8, seed=1234))
    rows = []
    for name in workloads:
        for batch in batches:
            # Interleave the two stacks so machine noise hits both alike.
            ours, theirs = [], []
            for r in range(repeats):
                work = WORKLOADS[name](batch, seed=r)
                ours.append(engine_throughput(engine, work))
                theirs.append(transformers_throughput(reference, work))
            row = {
                "workload": name,
                "batch": batch,
                "bisllm_tok_s": statistics.median(ours),
                "transformers_tok_s": statistics.median(theirs),
            }
            row["ratio"] = row["bisllm_tok_s"] / row["transformers_tok_s"]
            rows.append(row)
            print(
                f"  {name:>7} batch {batch:>3}: bisllm {row['bisllm_tok_s']:8.1f} tok/s   "
                f"transformers {row['transformers_tok_s']:8.1f} tok/s   ratio {row['ratio']:.2f}x"
            )
    return engine, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--no-cpu-kernels",
        action="store_true",
        help="Run the engine on its PyTorch paths only (no C++ CPU kernels).",
    )
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
        "dtype": args.dtype,
        "cpu_kernels": not args.no_cpu_kernels,
        "throughput": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for shape in args.shapes.split(","):
            print(f"{shape} ({SHAPES[shape]}):")
            path = build_tiny_qwen3_moe(Path(tmp) / shape, shape)
            engines[shape], results["throughput"][shape] = throughput_table(
                path,
                batches,
                args.repeats,
                args.workloads.split(","),
                args.device,
                args.dtype,
                cpu_kernels=not args.no_cpu_kernels,
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
