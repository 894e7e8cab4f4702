"""`bisllm bench`: offline benchmarks that need no GPU.

`bisllm bench router` replays a request trace through the router's real scoring code against
simulated workers in virtual time (bisllm_server.router.simulate) and reports cache hit rate,
load balance, simulated TTFT and the router's own decision latency.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from bisllm_server.router.simulate import SimResult, SimWorkerModel, simulate
from bisllm_server.router.traces import (
    DEFAULT_TRACE_BLOCK_SIZE,
    FORMATS,
    TraceError,
    load_trace,
)
from bisllm_truss.cli_common import fail

_DEFAULTS = SimWorkerModel()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """Offline benchmarks (no GPU needed)."""


@bench.command()
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Request trace: Mooncake JSONL or Azure LLM inference CSV.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default=None,
    help="Trace format (default: from the suffix, .jsonl mooncake, .csv azure).",
)
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--policy",
    type=click.Choice(["kv", "round_robin", "least_load"]),
    default="kv",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (last line).")
@click.option(
    "--trace-block-size",
    type=click.IntRange(min=1),
    default=DEFAULT_TRACE_BLOCK_SIZE,
    show_default=True,
    help="Tokens per block id in the trace; the simulated workers cache blocks of this size.",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Only the first N requests."
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Divide arrival times by this (2 = twice the request rate).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the router's RNG.")
@click.option(
    "--kv-capacity-tokens",
    type=click.IntRange(min=1),
    default=_DEFAULTS.kv_capacity_tokens,
    show_default=True,
    help="KV cache size of each simulated worker, in tokens.",
)
@click.option(
    "--prefill-tps",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.prefill_tokens_per_s,
    show_default=True,
    help="Prefill speed of each worker (uncached prompt tokens/s, one prompt at a time).",
)
@click.option(
    "--decode-tps",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.decode_tokens_per_s,
    show_default=True,
    help="Decode speed of each request (output tokens/s).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=None,
    help="router_temperature (default: the router's).",
)
@click.option(
    "--overlap-weight",
    type=click.FloatRange(min=0),
    default=None,
    help="router_overlap_score_weight (default: the router's).",
)
def router(
    trace_path: Path,
    fmt: Any,
    workers: int,
    policy: Any,
    as_json: bool,
    trace_block_size: int,
    limit: int | None,
    speed: float,
    seed: int,
    kv_capacity_tokens: int,
    prefill_tps: float,
    decode_tps: float,
    temperature: float | None,
    overlap_weight: float | None,
) -> None:
    """Replay a request trace through the router against simulated workers (virtual time)."""
    try:
        trace = load_trace(trace_path, fmt, block_size=trace_block_size, limit=limit, speed=speed)
    except (TraceError, ValueError) as exc:
        fail(str(exc))
    if not trace:
        fail(f"{trace_path}: no requests")
    model = SimWorkerModel(
        kv_capacity_tokens=kv_capacity_tokens,
        prefill_tokens_per_s=prefill_tps,
        decode_tokens_per_s=decode_tps,
        block_size=trace_block_size,
    )
    overrides: dict[str, Any] = {}
    if temperature is not None:
        overrides["router_temperature"] = temperature
    if overlap_weight is not None:
        overrides["router_overlap_score_weight"] = overlap_weight
    with _progress(len(trace)) as progress:
        try:
            result = simulate(trace, policy, workers, model, seed, overrides, progress)
        except ValueError as exc:
            fail(str(exc))
    _print_summary(trace_path, result)
    if as_json:
        click.echo(json.dumps(result.to_dict()))


@contextmanager
def _progress(total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for long runs, only when someone is watching it."""
    if total < 10_000 or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="req", file=sys.stderr, leave=False) as bar:

        def update(done: int) -> None:
            bar.update(done - bar.n)

        yield update


def _print_summary(trace_path: Path, r: SimResult) -> None:
    efficiency = "n/a" if r.efficiency is None else f"{r.efficiency:.1%}"
    lines = [
        f"{trace_path.name}: {r.requests} requests, {r.workers} workers, policy {r.policy}",
        f"  hit rate       {r.hit_rate:.1%} of prompt tokens (best possible {r.best_hit_rate:.1%}, "
        f"efficiency {efficiency}; best from reported blocks only {r.best_reported_hit_rate:.1%})",
        f"  imbalance      {r.imbalance:.3f} (max/mean busy prefill seconds; prefill "
        f"utilisation {r.prefill_utilisation:.0%})",
        f"  TTFT           p50 {r.ttft_p50_s:.3f} s, p99 {r.ttft_p99_s:.3f} s, "
        f"mean {r.ttft_mean_s:.3f} s (simulated)",
        f"  decision       p50 {r.decision_p50_ms:.3f} ms, p99 {r.decision_p99_ms:.3f} ms (wall)",
        f"  KV             {r.evicted_blocks} blocks evicted, peak {r.peak_kv_tokens} of "
        f"{r.kv_capacity_tokens} tokens per worker",
    ]
    click.echo("\n".join(lines))
