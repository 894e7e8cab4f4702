"""The worker capacity model, the autoscaling trace simulator and `bisllm bench autoscaler`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from bisllm_server.autoscaler.capacity import (
    ProfileError,
    WorkerProfile,
    default_profile,
    load_profile,
    profile_from_dict,
    sustainable_capacity,
)
from bisllm_server.autoscaler.policy import AutoscalerSettings
from bisllm_server.autoscaler.simulate import simulate
from bisllm_server.router.traces import TraceRequest
from bisllm_truss.cli import main


def _profile(**overrides: object) -> WorkerProfile:
    values: dict = dict(
        base_s=0.01,
        per_prefill_token_s=0.001,
        per_decode_seq_s=0.002,
        per_kv_token_s=1e-4,
        per_padded_pair_s=1e-7,
        max_batch_size=8,
        max_num_tokens=512,
        kv_capacity_tokens=100_000,
        startup_s=10.0,
        source="test",
    )
    values.update(overrides)
    return WorkerProfile(**values)


def _fixed(n: int = 1, **overrides: object) -> AutoscalerSettings:
    values: dict = dict(min_replica=n, max_replica=n, window_s=10, scale_down_delay_s=10)
    values.update(overrides)
    return AutoscalerSettings(**values)


def _req(t: float, prompt: int, output: int) -> TraceRequest:
    return TraceRequest(t, prompt, output, [])


# -- the step-time model ----------------------------------------------------------------------


def test_single_request_matches_the_step_model_by_hand() -> None:
    p = _profile()
    r = simulate([_req(0.0, 100, 5)], _fixed(), p, ttft_slo_s=1, tpot_slo_s=1).outcomes[0]
    # One prefill step: 100 tokens, a 1 x 100 x 100 padded rectangle, nothing decoding.
    prefill = 0.01 + 0.001 * 100 + 1e-7 * 100 * 100
    assert r.ttft_s == pytest.approx(prefill)
    # Four decode steps, batch 1, attending to 101, 102, 103, 104 tokens.
    decode = [0.01 + 0.002 + 1e-4 * kv for kv in (101, 102, 103, 104)]
    assert r.tpot_s == pytest.approx(sum(decode) / 4)
    assert r.finish_s == pytest.approx(prefill + sum(decode))


def test_chunked_prefill_and_a_decode_beside_it() -> None:
    p = _profile(per_kv_token_s=0.0, per_padded_pair_s=0.0)
    # The second request arrives while the first decodes: its 1,000-token prompt takes two
    # chunks (511 then 489 tokens: one budget token goes to the decoding request).
    result = simulate([_req(0.0, 10, 50), _req(0.05, 1000, 2)], _fixed(), p)
    first, second = result.outcomes
    t1 = 0.01 + 0.001 * 10  # first prefill
    steps = [t1]
    while sum(steps) < 0.05:  # decode steps of the first request that start before 0.05
        steps.append(0.012)
    start = sum(steps)
    chunk1 = 0.01 + 0.001 * 511 + 0.002
    chunk2 = 0.01 + 0.001 * 489 + 0.002
    assert second.ttft_s == pytest.approx(start + chunk1 + chunk2 - 0.05)
    assert first.ttft_s == pytest.approx(t1)


def test_kv_capacity_holds_back_admission() -> None:
    p = _profile(kv_capacity_tokens=300)
    result = simulate([_req(0.0, 150, 20), _req(0.0, 150, 20)], _fixed(), p)
    first, second = result.outcomes
    # 170 + 170 > 300: the second is admitted only when the first has finished.
    assert second.ttft_s > first.finish_s
    roomy = simulate([_req(0.0, 150, 20), _req(0.0, 150, 20)], _fixed(), _profile())
    assert roomy.outcomes[1].ttft_s < roomy.outcomes[0].finish_s


def test_requests_beyond_max_seq_len_are_rejected_and_too_big_for_kv_is_an_error() -> None:
    p = _profile(max_seq_len=200)
    result = simulate([_req(0.0, 150, 20), _req(0.0, 190, 20)], _fixed(), p)
    assert (result.requests, result.rejected_requests) == (1, 1)
    with pytest.raises(ValueError, match="need more KV than a worker holds"):
        simulate([_req(0.0, 150, 20)], _fixed(), _profile(kv_capacity_tokens=100))


# -- replica accounting and the policy loop -----------------------------------------------------


def test_replica_hours_of_a_fixed_pool_by_hand() -> None:
    trace = [_req(float(t), 50, 10) for t in range(0, 100, 10)]
    result = simulate(trace, _fixed(2), _profile(), tick_s=5)
    assert result.makespan_s == pytest.approx(max(o.finish_s for o in result.outcomes))
    assert result.replica_hours == pytest.approx(2 * result.makespan_s / 3600)
    assert result.mean_replicas == pytest.approx(2)
    assert result.scale_events == 0 and result.peak_replicas == 2


def _burst() -> list[TraceRequest]:
    """Light load, a 60 s burst of longer requests from t=100, then light load again."""
    trace = [_req(float(t), 100, 20) for t in range(0, 900, 5)]
    trace += [_req(100 + i * 0.2, 200, 100) for i in range(300)]
    return sorted(trace, key=lambda r: r.arrival_s)


def test_a_burst_scales_up_then_back_to_min_after_the_delay() -> None:
    settings = AutoscalerSettings(
        min_replica=1,
        max_replica=20,
        window_s=20,
        scale_down_delay_s=60,
        target=2000,
        max_scale_down_rate=50,
    )
    result = simulate(_burst(), settings, _profile(startup_s=10), tick_s=5)
    requested = [(t.time, t.requested) for t in result.timeline]
    peak_time, peak = max(requested, key=lambda x: x[1])
    assert peak >= 4 and 100 <= peak_time <= 250
    assert requested[-1][1] == 1  # back to min
    # No step down within the delay after the last scale-up.
    steps = list(itertools.pairwise(requested))
    last_up = max(t for (_, prev), (t, n) in steps if n > prev)
    first_down = min(t for (_, prev), (t, n) in steps if n < prev)
    assert first_down - last_up >= 60
    assert result.scale_events >= 2
    assert result.replica_hours > result.timeline[-1].time / 3600  # more than one replica's


def test_starting_replicas_count_as_capacity() -> None:
    # Steps cost nothing measurable and everything is admitted at once, so the in-flight
    # tokens depend on the load only, not on how many replicas are up.
    p = _profile(
        base_s=1e-6,
        per_prefill_token_s=0.0,
        per_decode_seq_s=0.0,
        per_kv_token_s=0.0,
        per_padded_pair_s=0.0,
        max_batch_size=1000,
        max_num_tokens=1_000_000,
        startup_s=300.0,
    )
    # 10 requests a second of 1,000 prompt tokens that decode for ~20 s (1e6 steps at 1e-6 s
    # would be too many; slow the decode with per_decode_seq_s instead).
    p = dataclasses.replace(p, per_decode_seq_s=2e-5)
    trace = [_req(i * 0.1, 1000, 100) for i in range(3000)]
    settings = AutoscalerSettings(
        min_replica=1, max_replica=50, window_s=30, scale_down_delay_s=600, target=5000
    )
    result = simulate(trace, settings, p, tick_s=5)
    requested = [t.requested for t in result.timeline]
    ups = sum(1 for a, b in itertools.pairwise(requested) if b > a)
    # It asks for what the load needs while the new replicas are still starting, instead of
    # asking again every tick until they are up (300 s later).
    settled = max(requested)
    final_desired = max(t.desired_scale for t in result.timeline)
    assert settled == math.ceil(final_desired - 0.1)
    assert settled < 50
    assert ups <= 6  # the window fills over 30 s: a few steps up, not one per tick for 300 s


def test_token_and_concurrency_policies_differ_on_mixed_request_sizes() -> None:
    # Same request rate and duration all along; prompts are 20x longer in the second half.
    small = [_req(i * 0.2, 50, 100) for i in range(1500)]
    big = [_req(300 + i * 0.2, 1000, 100) for i in range(1500)]
    # Prefill and attention are cheap, so both phases hold about as many requests at once.
    p = _profile(
        max_batch_size=64,
        max_num_tokens=4096,
        per_prefill_token_s=1e-6,
        per_kv_token_s=1e-8,
        per_padded_pair_s=0.0,
    )

    def desired(signal: str, target: float) -> tuple[float, float]:
        settings = AutoscalerSettings(
            min_replica=1, max_replica=100, window_s=30, target=target, signal=signal
        )
        result = simulate(small + big, settings, p, tick_s=5)
        at = {t.time: t.desired_scale for t in result.timeline}
        return at[250.0], at[550.0]

    tok_small, tok_big = desired("tokens", 1000)
    conc_small, conc_big = desired("concurrency", 4)
    assert tok_big / tok_small > 5  # the token signal sees 10x the tokens
    assert conc_big / conc_small < 2  # concurrency sees about the same number of requests


def test_deterministic() -> None:
    settings = AutoscalerSettings(min_replica=1, max_replica=20, window_s=20, target=2000)
    a = simulate(_burst(), settings, _profile(), tick_s=5)
    b = simulate(_burst(), settings, _profile(), tick_s=5)
    assert a.to_dict() == b.to_dict()
    assert a.outcomes == b.outcomes
    assert "timeline" not in a.to_dict() and "outcomes" not in a.to_dict()


# -- profiles and capacity ----------------------------------------------------------------------


def test_default_profile_loads_and_has_a_capacity() -> None:
    p = default_profile()
    assert p.source.startswith("benchmarks/calibrate_worker.py")
    c = sustainable_capacity(p, 1155, 211, 0.1)
    assert c.meets_tpot and c.step_s <= 0.1 and 1 <= c.decode_batch <= p.max_batch_size
    assert c.tokens_per_s == pytest.approx(c.requests_per_s * (1155 + 211))
    # A looser TPOT SLO never lowers the capacity.
    assert sustainable_capacity(p, 1155, 211, 1.0).tokens_per_s >= c.tokens_per_s


def test_profile_errors_name_the_field(tmp_path: Path) -> None:
    good = _profile().to_dict()
    with pytest.raises(ProfileError, match="field 'base_s': expected a number"):
        profile_from_dict({**good, "base_s": "fast"})
    with pytest.raises(ProfileError, match="field 'max_batch_size': expected an integer"):
        profile_from_dict({**good, "max_batch_size": 8.5})
    with pytest.raises(ProfileError, match=r"unknown field.*'speed'"):
        profile_from_dict({**good, "speed": 1})
    with pytest.raises(ProfileError, match="per_kv_token_s must be a finite number >= 0"):
        profile_from_dict({**good, "per_kv_token_s": -1})
    bad = tmp_path / "p.json"
    bad.write_text("{oops", encoding="utf-8")
    with pytest.raises(ProfileError, match=r"p\.json: not valid JSON"):
        load_profile(bad)
    missing = tmp_path / "m.json"
    missing.write_text(json.dumps({k: v for k, v in good.items() if k != "startup_s"}))
    with pytest.raises(ProfileError, match=r"m\.json: field 'startup_s'"):
        load_profile(missing)


# -- the CLI ------------------------------------------------------------------------------------


def _trace_file(tmp_path: Path) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(200):
        lines.append(f"2023-11-16 18:{i // 60:02d}:{i % 60:02d}.0000000,{300 + i % 7 * 100},{50}")
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_cli_json_last_line(tmp_path: Path) -> None:
    trace = _trace_file(tmp_path)
    result = CliRunner().invoke(
        main,
        ["bench", "autoscaler", "--trace", str(trace), "--policy", "concurrency", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    for key in ("slo_attainment", "replica_hours", "scale_events", "max_overshoot_replicas"):
        assert key in data
    assert data["policy"] == "concurrency" and data["target"] == 1.75
    assert "SLO attainment" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-replica", "0"], "Invalid value for '--min-replica'"),
        (["--tick", "0"], "Invalid value for '--tick'"),
        (["--max-scale-down-rate", "120"], "Invalid value for '--max-scale-down-rate'"),
        (["--half-life", "-1"], "Invalid value for '--half-life'"),
    ],
)
def test_cli_out_of_range_options_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(
        main, ["bench", "autoscaler", "--trace", str(_trace_file(tmp_path)), *args]
    )
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-scale-down-rate", "10", "--half-life", "600"], "--half-life exclude each other"),
        (["--min-replica", "3", "--max-replica", "2"], "--max-replica (2) must be >="),
        (["--initial-replicas", "9", "--max-replica", "4"], "--initial-replicas must be within"),
        (["--profile", "PROFILE"], "--profile: "),
    ],
)
def test_cli_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    profile = tmp_path / "bad.json"
    profile.write_text('{"base_s": 1}', encoding="utf-8")
    args = [str(profile) if a == "PROFILE" else a for a in args]
    result = CliRunner().invoke(
        main, ["bench", "autoscaler", "--trace", str(_trace_file(tmp_path)), *args]
    )
    assert result.exit_code == 1
    assert message in result.output
