"""`bisllm bench`: offline benchmarks that need no GPU.

`bisllm bench router` replays a request trace through the router's real scoring code against
simulated workers in virtual time (bisllm_server.router.simulate) and reports cache hit rate,
load balance, simulated TTFT and the router's own decision latency.

`bisllm bench autoscaler` replays a trace through simulated workers (the step-time model of a
measured worker profile) and the real autoscaling policy (bisllm_server.autoscaler.simulate)
and reports SLO attainment, replica-hours against a policy-independent oracle, scale events
and overshoot.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from bisllm_server.autoscaler import simulate as autoscale_sim
from bisllm_server.autoscaler.capacity import ProfileError, default_profile, load_profile
from bisllm_server.autoscaler.policy import AutoscalerSettings
from bisllm_server.router.simulate import SimResult, SimWorkerModel, simulate
from bisllm_server.router.traces import (
    DEFAULT_TRACE_BLOCK_SIZE,
    FORMATS,
    TraceError,
    load_trace,
)
from bisllm_truss.cli_common import fail

_DEFAULTS = SimWorkerModel()


def _trace_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every trace replay takes: the trace, its format, JSON output, a request
    limit and a speed-up."""
    for option in reversed(
        (
            click.option(
                "--trace",
                "trace_path",
                required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                help="Request trace: Mooncake JSONL or Azure LLM inference CSV.",
            ),
            click.option(
                "--format",
                "fmt",
                type=click.Choice(FORMATS),
                default=None,
                help="Trace format (default: from the suffix, .jsonl mooncake, .csv azure).",
            ),
            click.option(
                "--json", "as_json", is_flag=True, help="Print the results as JSON (last line)."
            ),
            click.option(
                "--limit",
                type=click.IntRange(min=1),
                default=None,
                help="Only the first N requests.",
            ),
            click.option(
                "--speed",
                type=click.FloatRange(min=0, min_open=True),
                default=1.0,
                show_default=True,
                help="Divide arrival times by this (2 = twice the request rate).",
            ),
        )
    ):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """Offline benchmarks (no GPU needed)."""


@bench.command()
@_trace_options
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--policy",
    type=click.Choice(["kv", "round_robin", "least_load"]),
    default="kv",
    show_default=True,
)
@click.option(
    "--trace-block-size",
    type=click.IntRange(min=1),
    default=DEFAULT_TRACE_BLOCK_SIZE,
    show_default=True,
    help="Tokens per block id in the trace; the simulated workers cache blocks of this size.",
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


# -- bench autoscaler ----------------------------------------------------------------------------

_SCALER = AutoscalerSettings()
_TARGETS = autoscale_sim.DEFAULT_TARGETS


@bench.command()
@_trace_options
@click.option(
    "--policy",
    type=click.Choice(["tokens", "concurrency"]),
    default="tokens",
    show_default=True,
    help="Scaling signal: in-flight tokens, or requests (waiting + running) per replica.",
)
@click.option(
    "--target",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help=f"Per-replica target in the signal's unit (default: {_TARGETS['tokens']:g} in-flight "
    f"tokens for --policy tokens, {_TARGETS['concurrency']:g} requests for --policy "
    "concurrency; both sized for the default profile, docs/benchmarks.md).",
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Worker profile JSON (default: the embedded model measured on a 2-core CPU, "
    "benchmarks/calibrate_worker.py).",
)
@click.option(
    "--min-replica",
    type=click.IntRange(min=1),
    default=_SCALER.min_replica,
    show_default=True,
    help="Fewest replicas (no scale to zero).",
)
@click.option("--max-replica", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--initial-replicas",
    type=int,
    default=None,
    help="Warm replicas at time 0 (default: --min-replica).",
)
@click.option(
    "--window",
    type=click.FloatRange(min=0, min_open=True),
    default=_SCALER.window_s,
    show_default=True,
    help="Seconds of load averaged per decision (autoscaling_window).",
)
@click.option(
    "--scale-down-delay",
    type=click.FloatRange(min=0),
    default=_SCALER.scale_down_delay_s,
    show_default=True,
    help="Seconds the load must stay low before a scale-down, and between scale-downs.",
)
@click.option(
    "--max-scale-down-rate",
    type=click.FloatRange(min=0, max=100, min_open=True),
    default=None,
    help=f"Percent of the replicas one scale-down may remove (default "
    f"{_SCALER.max_scale_down_rate:g}); not with --half-life.",
)
@click.option(
    "--half-life",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Scale down by exponential decay with this half-life in seconds instead.",
)
@click.option(
    "--tick",
    type=click.FloatRange(min=0, min_open=True),
    default=autoscale_sim.DEFAULT_TICK_S,
    show_default=True,
    help="Seconds between autoscaler decisions.",
)
@click.option(
    "--startup-s",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds from starting a replica to its first request (default: the profile's).",
)
@click.option(
    "--ttft-slo",
    type=click.FloatRange(min=0, min_open=True),
    default=autoscale_sim.DEFAULT_TTFT_SLO_S,
    show_default=True,
    help="Time-to-first-token SLO in seconds.",
)
@click.option(
    "--tpot-slo",
    type=click.FloatRange(min=0, min_open=True),
    default=autoscale_sim.DEFAULT_TPOT_SLO_S,
    show_default=True,
    help="Time-per-output-token SLO in seconds (also sizes the oracle's replica capacity).",
)
def autoscaler(
    trace_path: Path,
    fmt: Any,
    policy: Any,
    target: float | None,
    as_json: bool,
    limit: int | None,
    speed: float,
    profile_path: Path | None,
    min_replica: int,
    max_replica: int,
    initial_replicas: int | None,
    window: float,
    scale_down_delay: float,
    max_scale_down_rate: float | None,
    half_life: float | None,
    tick: float,
    startup_s: float | None,
    ttft_slo: float,
    tpot_slo: float,
) -> None:
    """Replay a request trace through simulated workers and the autoscaler (virtual time)."""
    if max_replica < min_replica:
        fail(f"--max-replica ({max_replica}) must be >= --min-replica ({min_replica})")
    if initial_replicas is not None and not min_replica <= initial_replicas <= max_replica:
        fail(
            f"--initial-replicas must be within [--min-replica, --max-replica] = "
            f"[{min_replica}, {max_replica}], got {initial_replicas}"
        )
    if max_scale_down_rate is not None and half_life is not None:
        fail("--max-scale-down-rate and --half-life exclude each other; give one")
    settings = AutoscalerSettings(
        min_replica=min_replica,
        max_replica=max_replica,
        window_s=window,
        scale_down_delay_s=scale_down_delay,
        target=target if target is not None else _TARGETS[policy],
        signal=policy,
        scale_down_policy="half_life" if half_life is not None else "rate",
        max_scale_down_rate=(
            max_scale_down_rate if max_scale_down_rate is not None else _SCALER.max_scale_down_rate
        ),
        scale_down_half_life_s=half_life,
    )
    try:
        profile = load_profile(profile_path) if profile_path else default_profile()
    except ProfileError as exc:
        fail(f"--profile: {exc}")
    try:
        trace = load_trace(trace_path, fmt, limit=limit, speed=speed)
    except (TraceError, ValueError) as exc:
        fail(str(exc))
    if not trace:
        fail(f"{trace_path}: no requests")
    with _progress(len(trace)) as progress:
        try:
            result = autoscale_sim.simulate(
                trace,
                settings,
                profile,
                tick_s=tick,
                initial_replicas=initial_replicas,
                startup_s=startup_s,
                ttft_slo_s=ttft_slo,
                tpot_slo_s=tpot_slo,
                progress=progress,
            )
        except ValueError as exc:
            fail(str(exc))
    _print_autoscale_summary(trace_path, result)
    if as_json:
        click.echo(json.dumps(result.to_dict()))


def _print_autoscale_summary(trace_path: Path, r: autoscale_sim.AutoscaleResult) -> None:
    unit = "in-flight tokens" if r.policy == "tokens" else "requests"
    lines = [
        f"{trace_path.name}: {r.requests} requests, policy {r.policy}, target {r.target:g} {unit} "
        f"per replica",
        f"  SLO attainment {r.slo_attainment:.2%} (TTFT <= {r.ttft_slo_s:g} s: "
        f"{r.ttft_attainment:.2%}, TPOT <= {r.tpot_slo_s:g} s: {r.tpot_attainment:.2%})",
        f"  TTFT           p50 {r.ttft_p50_s:.3f} s, p99 {r.ttft_p99_s:.3f} s (simulated)",
        f"  TPOT           p50 {r.tpot_p50_s * 1e3:.1f} ms, p99 {r.tpot_p99_s * 1e3:.1f} ms",
        f"  replicas       {r.replica_hours:.3f} replica-hours (oracle {r.oracle_replica_hours:.3f}),"
        f" mean {r.mean_replicas:.2f}, peak {r.peak_replicas}",
        f"  scaling        {r.scale_events} scale events, max overshoot "
        f"{r.max_overshoot_replicas} replicas (startup {r.startup_s:g} s, tick {r.tick_s:g} s)",
        f"  capacity       {r.capacity_tokens_per_s:.0f} tokens/s per replica at the TPOT SLO "
        f"(decode batch {r.capacity_decode_batch})",
    ]
    click.echo("\n".join(lines))
