"""What keeping parallel ranks together costs per decode step, on the embedded model, two gloo
ranks on this machine's CPU (one thread each).

    .venv/bin/python benchmarks/bench_parallel.py [--repeats 3] [--requests 8] [--tokens 48]
        [--json FILE]

Modes, alternated repeat by repeat so that drift of a shared machine hits them alike:
- `tp2`: tensor parallel over 2 ranks, each engine fed the same requests (offline: no
  messages between the ranks, only the model's all-reduces);
- `tp2-lockstep`: the same ranks as `bisllm serve` runs them: rank 0 leads, broadcasting each
  step's inbox and sampled tokens, rank 1 follows (engine/parallel/lockstep.py);
- `dp2-gather`: DP attention over 2 ranks, half the requests each, the MoE layers on every
  rank's tokens (gathered, then all-reduced);
- `dp2-a2a`: the same with expert parallelism 2, each rank's tokens sent to the experts'
  ranks and back by all-to-all (`TPGroup.moe_all_to_all`).

Workload: `--requests` prompts of ~40 tokens, `--tokens` output tokens each, greedy,
ignore_eos, all in one continuous batch. Figures: the median wall time of rank 0's decode
steps (steps with no prefill), median over repeats; the ratios lockstep / tp2 (what the
messages cost) and a2a / gather, each taken within a repeat and then the median; and the
leader's time inside its step messages per decode step, measured directly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.parallel.launch import spawn_local
from bisllm_server.engine.parallel.lockstep import StepFollower, StepInputs, StepLeader
from bisllm_server.engine.parallel.state import ParallelConfig, ParallelState
from bisllm_server.engine.parallel.tensor_parallel import engine_group
from bisllm_server.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
MODES = {
    "tp2": ParallelConfig(tp_size=2),
    "tp2-lockstep": ParallelConfig(tp_size=2),
    "dp2-gather": ParallelConfig(tp_size=2, attention_dp_size=2),
    "dp2-a2a": ParallelConfig(tp_size=2, ep_size=2, attention_dp_size=2),
}


def prompts(count: int) -> list[str]:
    topics = ["harbor", "lantern", "orchard", "glacier", "market", "violin", "comet", "garden"]
    return [
        f"Tell me a long story about the {topics[i % len(topics)]} number {i}, "
        "with many details about the people who lived there and what they did each day."
        for i in range(count)
    ]


class MessageClock:
    """Time a lockstep leader spends in its step messages (broadcasts included)."""

    def __init__(self, leader: StepLeader) -> None:
        self.seconds = 0.0
        send = leader._broadcast

        def timed(obj: Any = None) -> Any:
            start = time.perf_counter()
            try:
                return send(obj)
            finally:
                self.seconds += time.perf_counter() - start

        leader._broadcast = timed  # type: ignore[method-assign]


def decode_steps(
    llm: LLMEngine, step: Any, done: Any, clock: MessageClock | None = None
) -> list[tuple[float, float]]:
    """(wall time, time in step messages) of the steps that only decoded."""
    times = []
    while not done():
        start, messages = time.perf_counter(), clock.seconds if clock else 0.0
        step()
        seconds = time.perf_counter() - start
        stats = llm.stats
        if stats.prefill_tokens == 0 and stats.decode_tokens > 0:
            times.append((seconds, (clock.seconds if clock else 0.0) - messages))
    return times


def _rank(state: ParallelState, mode: str, requests: int, tokens: int) -> list[tuple[float, float]]:
    torch.set_num_threads(1)
    config = EngineConfig(model=CHECKPOINT, dtype="float32", num_kv_pages=512)
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    rank = state.layout.rank
    work = prompts(requests)
    if mode.startswith("dp2"):
        work = work[rank::2]  # each DP rank serves its own half
    if mode != "tp2-lockstep":
        llm = LLMEngine(config, tp=engine_group(state))
        for prompt in work:
            llm.add_request(prompt, sp)

        def all_done() -> bool:
            # DP attention: step while any rank has work (the MoE collectives need both).
            busy = torch.tensor([int(llm.has_unfinished_requests())])
            dist.all_reduce(busy)
            return not busy.item()

        return decode_steps(llm, llm.step, all_done)
    control = dist.new_group([0, 1], backend="gloo")
    if rank == 1:
        follower = LLMEngine(config, tp=engine_group(state), lockstep=StepFollower(control, 0))
        return decode_steps(follower, follower.step, lambda: follower.lockstep_stopped)
    leader = StepLeader(control, 0)
    clock = MessageClock(leader)
    llm = LLMEngine(config, tp=engine_group(state), lockstep=leader)
    for prompt in work:
        llm.add_request(prompt, sp)
    times = decode_steps(llm, llm.step, lambda: not llm.has_unfinished_requests(), clock)
    leader.publish_inputs(StepInputs(digest=(), stop=True))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    messages: list[float] = []
    for repeat in range(args.repeats):
        order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
        for mode in order:
            results = spawn_local(
                _rank, MODES[mode], args=(mode, args.requests, args.tokens), timeout_s=600
            )
            runs[mode].append(statistics.median(t for t, _ in results[0]) * 1000)
            if mode == "tp2-lockstep":
                messages.append(statistics.median(m for _, m in results[0]) * 1000)
            print(f"repeat {repeat + 1} {mode}: {runs[mode][-1]:.2f} ms/step", flush=True)

    def ratio(a: str, b: str) -> float:
        # Within each repeat, then the median: drift between repeats cancels.
        return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))

    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, one thread per rank",
        "requests": args.requests,
        "output_tokens": args.tokens,
        "decode_step_ms": {mode: statistics.median(v) for mode, v in runs.items()},
        "leader_message_ms_per_step": statistics.median(messages),
        "runs_ms": runs,
        "lockstep_over_tp2": ratio("tp2-lockstep", "tp2"),
        "a2a_over_gather": ratio("dp2-a2a", "dp2-gather"),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
