"""Token-based vs concurrency-based autoscaling on the Azure conv trace, in simulation.

    .venv/bin/python benchmarks/bench_autoscaler.py [--trace FILE] [--speed 3] [--goal 0.99]
        [--scale-down-delay 300] [--scale-down-rate 20] [--json results.json]

Replays the trace (bisllm_server.autoscaler.simulate, the code behind `bisllm bench
autoscaler`) on the embedded CPU worker profile for a sweep of targets per policy, and picks
for each policy the cheapest target (fewest replica-hours) whose SLO attainment (TTFT and TPOT
both met) reaches `--goal`; then the ratio of the two policies' replica-hours at that point.
Three scenarios (SCENARIOS): a cold start from 10 replicas (below what the load needs), a warm
start from 16, and a warm start where the request mix shifts at half time.

Setup, and why:

- `--speed 3`: the trace offers ~5K prompt+output tokens/s; one embedded-CPU replica sustains
  ~1.8K at the TPOT SLO, so at 3x the oracle needs 8-9 replicas at the peak and the policies
  run 10-25: enough replicas that whole-replica rounding does not decide the result.
- SLOs: TTFT 2 s (an unloaded replica prefills 99% of the trace's prompts in < 1 s, a
  2K-token prompt beside a full decode batch in ~2 s) and TPOT 100 ms (~10x a decode step).
- Window 60 s, 5 s tick, startup 60 s (a pod start: the 5 s measured process start leaves out
  scheduling and pulling the image); scale-down delay and rate default to BIS-LLM's 300 s and
  20% (the run is ~20 minutes long, so they cap how far any policy can come down; rerun with
  `--scale-down-delay 60 --scale-down-rate 50` to let the policies track the load).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bisllm_server.autoscaler.capacity import default_profile
from bisllm_server.autoscaler.policy import AutoscalerSettings
from bisllm_server.autoscaler.simulate import AutoscaleResult, simulate
from bisllm_server.router.traces import TraceRequest, load_trace

REPO = Path(__file__).resolve().parents[1]
AZURE = "AzureLLMInferenceTrace_conv_2023.csv"
TARGETS = {
    "tokens": (1000, 1500, 1750, 2000, 2250, 2500, 2750, 3000, 3250, 3500, 4000, 6000),
    "concurrency": (1, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 4, 6),
}
# (name, initial replicas, request mix): "recorded" replays the trace as it is; "shift" makes
# the second half's prompts 3x longer (within the model's context) and keeps every other of its
# requests, so tokens per request change mid-trace while tokens per second stay close.
SCENARIOS = (
    ("cold start (10 replicas), recorded mix", 10, "recorded"),
    ("warm start (16 replicas), recorded mix", 16, "recorded"),
    ("warm start (16 replicas), mix shift at half time", 16, "shift"),
)
TTFT_SLO_S = 2.0
TPOT_SLO_S = 0.1


def find_trace(name: str) -> Path:
    for root in (REPO.parent / "shared", REPO / "shared", Path("/work/shared")):
        path = root / "traces" / name
        if path.is_file():
            return path
    return REPO.parent / "shared" / "traces" / name


def shift_mix(trace: list[TraceRequest], max_seq_len: int) -> list[TraceRequest]:
    """The second half (by arrival time) with 3x longer prompts and half the requests."""
    half = trace[-1].arrival_s / 2
    shifted = []
    late = 0
    for r in trace:
        if r.arrival_s < half:
            shifted.append(r)
            continue
        late += 1
        if late % 2:
            continue
        room = max(1, max_seq_len - r.output_tokens)
        longer = max(r.input_tokens, min(3 * r.input_tokens, room))
        shifted.append(TraceRequest(r.arrival_s, longer, r.output_tokens, []))
    return shifted


def run(
    trace: list, policy: str, target: float, initial: int, args: argparse.Namespace
) -> AutoscaleResult:
    settings = AutoscalerSettings(
        min_replica=1,
        max_replica=args.max_replica,
        window_s=60.0,
        scale_down_delay_s=args.scale_down_delay,
        max_scale_down_rate=args.scale_down_rate,
        target=target,
        signal=policy,  # type: ignore[arg-type]
    )
    return simulate(
        trace,
        settings,
        default_profile(),
        initial_replicas=initial,
        startup_s=args.startup_s,
        ttft_slo_s=TTFT_SLO_S,
        tpot_slo_s=TPOT_SLO_S,
    )


def cheapest(results: list[AutoscaleResult], goal: float) -> AutoscaleResult | None:
    passing = [r for r in results if r.slo_attainment >= goal]
    return min(passing, key=lambda r: r.replica_hours) if passing else None


def table(results: list[AutoscaleResult]) -> str:
    rows = [
        "| policy | target | SLO att. | TTFT att. | TPOT att. | TTFT p99 (s) | replica-h "
        "| oracle replica-h | scale events | max overshoot | peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.policy} | {r.target:g} | {r.slo_attainment:.2%} | {r.ttft_attainment:.2%} "
            f"| {r.tpot_attainment:.2%} | {r.ttft_p99_s:.2f} | {r.replica_hours:.2f} "
            f"| {r.oracle_replica_hours:.2f} | {r.scale_events} | {r.max_overshoot_replicas} "
            f"| {r.peak_replicas} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("--speed", type=float, default=3.0)
    parser.add_argument("--goal", type=float, default=0.99)
    parser.add_argument("--max-replica", type=int, default=64)
    parser.add_argument("--startup-s", type=float, default=60.0)
    parser.add_argument("--scale-down-delay", type=float, default=300.0)
    parser.add_argument("--scale-down-rate", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    path = args.trace or find_trace(AZURE)
    recorded = load_trace(path, speed=args.speed)
    max_seq_len = default_profile().max_seq_len or 2048
    traces = {"recorded": recorded, "shift": shift_mix(recorded, max_seq_len)}
    started = time.perf_counter()
    summary: dict = {"trace": path.name, "speed": args.speed, "goal": args.goal, "scenarios": []}
    lines = []
    for name, initial, mix in SCENARIOS:
        results = {
            policy: [run(traces[mix], policy, t, initial, args) for t in targets]
            for policy, targets in TARGETS.items()
        }
        first = results["tokens"][0]
        print(
            f"## {name}: {first.requests} requests served ({first.rejected_requests} longer "
            f"than max_seq_len left out), one replica sustains "
            f"{first.capacity_tokens_per_s:.0f} tokens/s\n"
        )
        print(table([r for rs in results.values() for r in rs]))
        print()
        best = {policy: cheapest(rs, args.goal) for policy, rs in results.items()}
        ratio = None
        if best["tokens"] and best["concurrency"]:
            ratio = best["tokens"].replica_hours / best["concurrency"].replica_hours
        cells = []
        for policy in TARGETS:
            r = best[policy]
            cells.append(
                "none reaches the goal"
                if r is None
                else f"{r.target:g} ({r.slo_attainment:.2%}, {r.replica_hours:.2f} rh, "
                f"{r.scale_events} events, overshoot {r.max_overshoot_replicas})"
            )
        lines.append(
            f"| {name} | {cells[0]} | {cells[1]} | {'n/a' if ratio is None else f'{ratio:.3f}'} |"
        )
        summary["scenarios"].append(
            {
                "name": name,
                "initial_replicas": initial,
                "mix": mix,
                "ratio_tokens_over_concurrency": ratio,
                "best": {p: (r.to_dict() if r else None) for p, r in best.items()},
                "runs": [r.to_dict() for rs in results.values() for r in rs],
            }
        )
    summary["seconds"] = time.perf_counter() - started
    print(
        f"Cheapest target with >= {args.goal:.0%} SLO attainment "
        f"({summary['seconds']:.0f} s in all):\n"
    )
    print("| scenario | tokens | concurrency | tokens / concurrency replica-h |")
    print("|---|---|---|---:|")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
