"""Where an engine run's time goes, step by step, on one workload of bench_engine.py.

    python benchmarks/profile_steps.py [--device cuda] [--dtype bfloat16] [--workload mixed]
        [--batch 1] [--seeds 0,1,0]

For each seed: total time, prefill-step total, decode-step median / max, and the slowest steps;
then one torch.profiler table (CPU, plus CUDA on a GPU) for one more run, and transformers'
`generate` time on the same requests. Written to chase the slow `mixed` workload on an H100
(docs/benchmarks.md): a cost paid per new shape shows up as slow first steps that vanish when
the same seed runs again.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import (
    SHAPES,
    WORKLOADS,
    Workload,
    build_tiny_qwen3_moe,
    synchronize,
    transformers_throughput,
)
from torch.profiler import ProfilerActivity, profile

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams


def run_steps(engine: LLMEngine, work: Workload, label: str) -> None:
    for prompt, n in zip(work.prompts, work.output_lens, strict=True):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add_request(prompt, params, detokenize=False)
    steps = []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.stats
        steps.append((s.step_seconds, s.forward_seconds, s.prefill_tokens, s.decode_tokens))
    total = time.perf_counter() - start
    prefill = [t for t in steps if t[2] > 0]
    decode = [t[0] for t in steps if t[2] == 0] or [0.0]
    print(
        f"{label}: {total * 1e3:.0f} ms, {len(steps)} steps; prefill steps {len(prefill)} "
        f"({sum(t[0] for t in prefill) * 1e3:.0f} ms); decode median "
        f"{statistics.median(decode) * 1e3:.2f} ms, max {max(decode) * 1e3:.1f} ms"
    )
    slowest = sorted(steps, reverse=True)[:4]
    print(
        "   slowest (step ms, forward ms, prefill tokens, decode tokens):",
        [(round(a * 1e3, 1), round(b * 1e3, 1), c, d) for a, b, c, d in slowest],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", default="qwen3-like", choices=list(SHAPES))
    parser.add_argument("--workload", default="mixed", choices=list(WORKLOADS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seeds", default="0,1,0")
    args = parser.parse_args()
    make_work = WORKLOADS[args.workload]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_qwen3_moe(Path(tmp) / args.shape, args.shape)
        engine = LLMEngine(
            EngineConfig(
                model=path,
                dtype=args.dtype,
                device=args.device,
                max_batch_size=64,
                max_num_tokens=4096,
                num_kv_pages=4096,
            )
        )
        for seed in (int(s) for s in args.seeds.split(",")):
            engine.reset_prefix_cache()
            run_steps(engine, make_work(args.batch, seed), f"{args.workload} seed {seed}")

        activities = [ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        engine.reset_prefix_cache()
        with profile(activities=activities) as prof:
            run_steps(engine, make_work(args.batch, 99), "profiled")
        synchronize(torch.device(args.device))
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50))

        from transformers import AutoModelForCausalLM

        reference = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
        reference = reference.to(args.device).eval()
        for seed in (int(s) for s in args.seeds.split(",")):
            rate = transformers_throughput(reference, make_work(args.batch, seed))
            print(f"transformers generate, seed {seed}: {rate:.1f} tok/s")


if __name__ == "__main__":
    main()
