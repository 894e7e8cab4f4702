"""The KV-aware router on request traces, and the cost of one routing decision.

    .venv/bin/python benchmarks/bench_router.py [--trace FILE] [--azure-trace FILE] [--no-azure]

1. Trace replay (`bisllm_server.router.simulate`, the same code as `bisllm bench router`): the
   Mooncake synthetic trace over 8 simulated workers with the kv, round_robin and least_load
   policies, as a markdown table plus kv / round_robin ratios; then the Azure conv trace
   (no prefix sharing, so only balance matters), replayed 8x faster so that 8 workers are about
   as busy as on Mooncake.
2. Decision latency: 64 workers with engine block size 16, each index pre-filled with 4,096
   blocks, 8,192-token prompts (512 blocks), half of them sharing a long prefix with two
   workers' caches. `Router.choose` p50/p99 (its own `decision_seconds`, target <= 1 ms), the
   index lookup alone, and hashing the prompt with `hash_token_blocks`; medians over repeats.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from bisllm_server.kv_events import BlockStored, hash_token_blocks
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.core import Router, RouteRequest
from bisllm_server.router.simulate import SimResult, percentile, simulate
from bisllm_server.router.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
MOONCAKE = "mooncake_synthetic_trace.jsonl"
AZURE = "AzureLLMInferenceTrace_conv_2023.csv"
POLICIES = ("kv", "round_robin", "least_load")


def find_trace(name: str) -> Path:
    """The shared traces sit beside the checkout (../shared/traces) or, on a copied tree, in it."""
    for root in (REPO.parent / "shared", REPO / "shared", Path("/work/shared")):
        path = root / "traces" / name
        if path.is_file():
            return path
    return REPO.parent / "shared" / "traces" / name  # the error then names the expected place


# -- trace replay ----------------------------------------------------------------------------------


def replay(path: Path, workers: int, speed: float, seed: int) -> dict[str, SimResult]:
    trace = load_trace(path, speed=speed)
    return {policy: simulate(trace, policy, workers, seed=seed) for policy in POLICIES}


def replay_table(results: dict[str, SimResult]) -> str:
    rows = [
        "| policy | hit rate | best possible | efficiency | best (reported only) | imbalance "
        "| prefill util. | TTFT p50 (s) | TTFT p99 (s) | TTFT mean (s) | decision p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy, r in results.items():
        efficiency = "–" if r.efficiency is None else f"{r.efficiency:.1%}"
        rows.append(
            f"| {policy} | {r.hit_rate:.1%} | {r.best_hit_rate:.1%} | {efficiency} "
            f"| {r.best_reported_hit_rate:.1%} | {r.imbalance:.3f} | {r.prefill_utilisation:.0%} "
            f"| {r.ttft_p50_s:.3f} | {r.ttft_p99_s:.3f} | {r.ttft_mean_s:.3f} "
            f"| {r.decision_p99_ms:.3f} |"
        )
    return "\n".join(rows)


def ratios(results: dict[str, SimResult]) -> str:
    kv, rr = results["kv"], results["round_robin"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "–"

    return (
        f"kv / round_robin: hit rate {ratio(kv.hit_rate, rr.hit_rate)}, "
        f"TTFT p50 {ratio(kv.ttft_p50_s, rr.ttft_p50_s)}, "
        f"TTFT p99 {ratio(kv.ttft_p99_s, rr.ttft_p99_s)}, "
        f"TTFT mean {ratio(kv.ttft_mean_s, rr.ttft_mean_s)}, "
        f"busy prefill seconds {ratio(sum(kv.busy_s_per_worker), sum(rr.busy_s_per_worker))}, "
        f"imbalance {ratio(kv.imbalance, rr.imbalance)}"
    )


# -- decision latency ------------------------------------------------------------------------------


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 150_000) for _ in range(n)]


def build_router(
    rng: random.Random,
    workers: int,
    block_size: int,
    prompt_tokens: int,
    blocks_per_worker: int,
    system: list[int],
) -> tuple[Router, list[list[int]]]:
    """A router whose index holds `blocks_per_worker` blocks per worker; returns it and the
    shared documents (each cached, with different suffixes, on two workers). Every prompt,
    cached or routed, starts with `system`."""
    router = Router(RouterConfig(policy="kv"), rng=random.Random(rng.random()))
    chains_per_worker = max(1, blocks_per_worker * block_size // prompt_tokens)
    doc_tokens = prompt_tokens * 3 // 4  # shared prefix: 3/4 of a prompt
    docs = [system + _tokens(rng, doc_tokens - len(system)) for _ in range(workers)]
    for i in range(workers):
        name = f"w{i}"
        router.add_worker(name, block_size=block_size, max_num_tokens=8192)
        for c in range(chains_per_worker):
            # Two chains extend shared documents (this worker's and its neighbour's); the rest
            # are unrelated prompts.
            if c < 2:
                doc = docs[(i + c) % workers]
                tokens = doc + _tokens(rng, prompt_tokens - doc_tokens)
            else:
                tokens = system + _tokens(rng, prompt_tokens - len(system))
            ids = hash_token_blocks(tokens, block_size)
            router.index.apply(name, BlockStored(ids, None, [], block_size))
    return router, docs


def decision_latency(
    *,
    workers: int = 64,
    block_size: int = 16,
    prompt_tokens: int = 8192,
    blocks_per_worker: int = 4096,
    prompts: int = 300,
    repeats: int = 5,
    prefilling_max: int = 32,
    decoding_max: int = 224,
    system_prompt_tokens: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Median over repeats of choose p50/p99, index lookup p50 and prompt hashing p50 (ms).

    With `system_prompt_tokens`, every prompt starts with the same system prompt, cached on
    every worker: the index's worst case, as no worker can be ruled out by the first block."""
    rng = random.Random(seed)
    system = _tokens(rng, system_prompt_tokens)
    router, docs = build_router(rng, workers, block_size, prompt_tokens, blocks_per_worker, system)
    stats: dict[str, list[float]] = {k: [] for k in ("choose_p50", "choose_p99", "lookup_p50")}
    hash_ms: list[float] = []
    prefilling: deque[str] = deque()
    decoding: deque[str] = deque()
    serial = 0
    for _ in range(repeats):
        choose_ms, lookup_ms = [], []
        for _ in range(prompts):
            if rng.random() < 0.5:
                doc = rng.choice(docs)
                tokens = doc + _tokens(rng, prompt_tokens - len(doc))
            else:
                tokens = system + _tokens(rng, prompt_tokens - len(system))
            t0 = time.perf_counter()
            ids = hash_token_blocks(tokens, block_size)
            hash_ms.append((time.perf_counter() - t0) * 1000)
            serial += 1
            request = RouteRequest(f"r{serial}", prompt_tokens, ids)
            decision = router.choose(request)
            choose_ms.append(decision.decision_seconds * 1000)
            # The lookup again, alone, to split choose's time (caches as warm as choose left
            # them, so this is a lower bound of its share).
            t0 = time.perf_counter()
            router.index.overlaps(ids)
            lookup_ms.append((time.perf_counter() - t0) * 1000)
            # Keep requests in flight (some prefilling, most decoding), so loads and predicted
            # blocks (predict-on-route) are part of what choose weighs, as in a live router.
            router.start(decision, request)
            prefilling.append(request.request_id)
            if len(prefilling) > prefilling_max:
                decoding.append(prefilling.popleft())
                router.first_token(decoding[-1])
            if len(decoding) > decoding_max:
                router.finish(decoding.popleft())
        stats["choose_p50"].append(percentile(choose_ms, 50))
        stats["choose_p99"].append(percentile(choose_ms, 99))
        stats["lookup_p50"].append(percentile(lookup_ms, 50))
    result = {k: statistics.median(v) for k, v in stats.items()}
    result["hash_p50"] = percentile(hash_ms, 50)
    result["index_blocks_per_worker"] = statistics.mean(
        router.index.num_blocks(f"w{i}") for i in range(workers)
    )
    return result


# -- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=find_trace(MOONCAKE))
    parser.add_argument("--azure-trace", type=Path, default=find_trace(AZURE))
    parser.add_argument("--no-azure", action="store_true", help="Skip the Azure replay.")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--azure-speed", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5, help="Decision-latency repeats.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in (args.trace, *(() if args.no_azure else (args.azure_trace,))):
        if not path.is_file():
            sys.exit(f"error: trace not found: {path} (pass its path)")

    t0 = time.perf_counter()
    results = replay(args.trace, args.workers, 1.0, args.seed)
    print(f"## {args.trace.name}, {args.workers} workers ({time.perf_counter() - t0:.1f} s)\n")
    print(replay_table(results))
    print(f"\n{ratios(results)}\n")

    if not args.no_azure:
        t0 = time.perf_counter()
        azure = replay(args.azure_trace, args.workers, args.azure_speed, args.seed)
        print(
            f"## {args.azure_trace.name}, {args.workers} workers, {args.azure_speed:g}x speed "
            f"({time.perf_counter() - t0:.1f} s)\n"
        )
        print(replay_table(azure))
        print(f"\n{ratios(azure)}\n")

    t0 = time.perf_counter()
    scenarios = {
        "prompts start apart": decision_latency(repeats=args.repeats, seed=args.seed),
        "1,024-token system prompt on every worker": decision_latency(
            repeats=args.repeats, seed=args.seed, system_prompt_tokens=1024
        ),
    }
    print(
        f"## Decision latency: 64 workers, block size 16, 8,192-token prompts, "
        f"medians of {args.repeats} repeats ({time.perf_counter() - t0:.1f} s)\n"
    )
    print(
        "| scenario | `choose` p50 (ms) | `choose` p99 (ms) | its `overlaps` again, warm, p50 (ms) "
        "| `hash_token_blocks` p50 (ms) | index blocks / worker |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in scenarios.items():
        print(
            f"| {name} | {r['choose_p50']:.3f} | {r['choose_p99']:.3f} | {r['lookup_p50']:.3f} "
            f"| {r['hash_p50']:.3f} | {r['index_blocks_per_worker']:.0f} |"
        )


if __name__ == "__main__":
    main()
