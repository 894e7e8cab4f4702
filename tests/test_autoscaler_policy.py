"""The autoscaling policy, rule by rule (server/autoscaler/policy.py), and its metrics."""

from __future__ import annotations

import itertools

import pytest
from prometheus_client import CollectorRegistry

from bisllm_server.autoscaler.metrics import AUTOSCALER_GAUGES, AutoscalerMetrics
from bisllm_server.autoscaler.planner import Planner
from bisllm_server.autoscaler.policy import Autoscaler, AutoscalerSettings, LoadSample
from bisllm_server.router.core import PoolLoad

TARGET = 1000.0


def settings(**overrides) -> AutoscalerSettings:
    values = dict(
        min_replica=1,
        max_replica=10,
        window_s=60.0,
        scale_down_delay_s=30.0,
        target=TARGET,
        max_scale_down_rate=50.0,
    )
    values.update(overrides)
    return AutoscalerSettings(**values)


def feed(scaler: Autoscaler, start: float, end: float, tokens: float, step: float = 1.0, **kw):
    """One sample per `step` seconds in [start, end), deciding after each; the last decision."""
    t = start
    decision = None
    while t < end:
        scaler.observe(LoadSample(t, tokens, kw.get("requests", 0), kw.get("workers", 1)))
        decision = scaler.decide(t)
        t += step
    assert decision is not None
    return decision


def test_target_division_and_window_average() -> None:
    scaler = Autoscaler(settings(window_s=10.0), initial_replicas=1)
    feed(scaler, 0, 10, 0)
    # Five samples at 4,000 tokens after ten at zero: the 10 s window holds 5 zeros and 5 high.
    d = feed(scaler, 10, 15, 4000)
    assert d.in_flight_tokens == 4000
    assert d.avg_in_flight_tokens == pytest.approx(2000)
    assert d.desired_scale == pytest.approx(2.0)
    assert d.rounded_desired_scale == 2
    # Once the window holds only the high readings, the desired scale is the full 4.
    d = feed(scaler, 15, 20, 4000)
    assert d.avg_in_flight_tokens == pytest.approx(4000)
    assert d.desired_scale == pytest.approx(4.0) and d.rounded_desired_scale == 4


def test_window_before_it_is_full_averages_what_exists() -> None:
    scaler = Autoscaler(settings(window_s=300.0))
    d = feed(scaler, 0, 3, 3000)
    assert d.avg_in_flight_tokens == 3000 and d.rounded_desired_scale == 3


def test_concurrency_signal_divides_requests() -> None:
    scaler = Autoscaler(settings(signal="concurrency", target=8.0))
    d = feed(scaler, 0, 2, 10**9, requests=20)
    assert d.desired_scale == pytest.approx(2.5) and d.rounded_desired_scale == 3


def test_min_and_max_bound_the_scale_but_not_the_raw_desire() -> None:
    scaler = Autoscaler(settings(min_replica=2, max_replica=4), initial_replicas=1)
    assert scaler.current == 2  # the initial count is clamped too
    d = feed(scaler, 0, 1, 0)
    assert d.desired_scale == 0 and d.rounded_desired_scale == 2
    d = feed(scaler, 1, 2, 50_000)
    assert d.desired_scale == pytest.approx((0 + 50_000) / 2 / TARGET)
    assert d.policy_desired_scale == 4 and d.rounded_desired_scale == 4


@pytest.mark.parametrize(
    ("desired_tokens", "rounded"),
    [(2000, 2), (2100, 2), (2110, 3), (2900, 3), (1, 1)],
)
def test_rounding_up_with_a_tenth_of_slack(desired_tokens: float, rounded: int) -> None:
    scaler = Autoscaler(settings())
    assert feed(scaler, 0, 1, desired_tokens).rounded_desired_scale == rounded


def test_scale_up_is_immediate_and_asked_once_while_replicas_start() -> None:
    """The division ignores how many replicas are healthy: while new ones load (the sample's
    num_workers stays 1) the same load asks for the same count, tick after tick."""
    scaler = Autoscaler(settings(window_s=5.0))
    d = feed(scaler, 0, 5, 5000, workers=1)
    assert d.rounded_desired_scale == 5 and scaler.scale_events == 1
    d = feed(scaler, 5, 60, 5000, workers=1)  # a minute of starting replicas
    assert d.rounded_desired_scale == 5 and scaler.scale_events == 1
    assert d.avg_num_workers == 1


def test_scale_down_waits_for_the_delay_after_the_load_drops() -> None:
    scaler = Autoscaler(settings(window_s=2.0, scale_down_delay_s=30.0, max_scale_down_rate=100))
    feed(scaler, 0, 10, 4000)
    assert scaler.current == 4
    # The load is gone at t=10; the window empties by t=12, yet the count holds for the delay.
    for t in range(10, 40):
        d = feed(scaler, t, t + 1, 0)
        assert d.rounded_desired_scale == 4, f"scaled down at t={t}, before the 30 s delay"
    # At t=10 the 2 s window still held one busy reading (2 replicas' worth); that is the
    # highest recommendation of the 30 s before t=40, so the first step stops at 2...
    d = feed(scaler, 40, 41, 0)
    assert d.rounded_desired_scale == 2
    # ...and the next waits a full delay after that step.
    d = feed(scaler, 41, 70, 0)
    assert d.rounded_desired_scale == 2
    d = feed(scaler, 70, 71, 0)
    assert d.rounded_desired_scale == 1


def test_a_brief_spike_during_the_delay_holds_the_count() -> None:
    """Scale-down uses the highest recommendation over the delay (HPA stabilisation)."""
    scaler = Autoscaler(settings(window_s=1.0, scale_down_delay_s=20.0, max_scale_down_rate=100))
    feed(scaler, 0, 5, 3000)
    assert scaler.current == 3
    feed(scaler, 5, 26, 0)  # quiet for 21 s: would scale down now...
    assert scaler.current == 1
    scaler = Autoscaler(settings(window_s=1.0, scale_down_delay_s=20.0, max_scale_down_rate=100))
    feed(scaler, 0, 5, 3000)
    feed(scaler, 5, 15, 0)
    feed(scaler, 15, 16, 2500)  # ...but a reading of 2.5 replicas' worth 10 s in
    d = feed(scaler, 16, 30, 0)
    assert d.rounded_desired_scale == 3, "scaled below a recommendation from within the delay"
    d = feed(scaler, 30, 37, 0)
    assert d.rounded_desired_scale == 1


def test_rate_limits_each_step_and_waits_a_full_delay_between_steps() -> None:
    scaler = Autoscaler(settings(window_s=1.0, scale_down_delay_s=10.0, max_scale_down_rate=20))
    feed(scaler, 0, 2, 10_000, workers=10)
    assert scaler.current == 10
    history = []
    for t in range(2, 80):
        d = feed(scaler, t, t + 1, 0)
        if d.changed:
            history.append((t, d.rounded_desired_scale))
    # 20% of 10 = 2, of 8 = 1.6 -> 1 (at least one), ...; each step 10 s after the previous.
    counts = [c for _, c in history]
    assert counts[:4] == [8, 7, 6, 5]
    times = [t for t, _ in history]
    assert all(b - a >= 10 for a, b in itertools.pairwise(times))
    assert times[0] >= 2 + 10


def test_half_life_decays_the_count_exponentially() -> None:
    half_life = 20.0
    scaler = Autoscaler(
        settings(
            window_s=1.0,
            scale_down_delay_s=0.0,
            scale_down_policy="half_life",
            scale_down_half_life_s=half_life,
        )
    )
    feed(scaler, 0, 1, 8000, workers=8)
    assert scaler.current == 8
    counts = {}
    for t in range(1, 200):
        d = feed(scaler, t, t + 1, 0)
        counts[t] = d.rounded_desired_scale
    # 8 -> 7 needs 8·0.5^(e/20) <= 7: e >= 3.85 s after the change at t=0, so the tick at 4.
    first_down = min(t for t, c in counts.items() if c < 8)
    assert first_down == 4
    assert counts[199] == 1
    # Each step restarts the curve from the new count, so halving takes one half-life plus
    # the wait for each step's tick: 8 -> 4 in 20-24 s.
    reach_four = min(t for t, c in counts.items() if c <= 4)
    assert half_life <= reach_four <= half_life + 4


def test_settings_reject_scale_to_zero_and_bad_values() -> None:
    with pytest.raises(ValueError, match="min_replica must be at least 1"):
        AutoscalerSettings(min_replica=0)
    with pytest.raises(ValueError, match=r"max_replica \(1\) must be >= min_replica \(2\)"):
        AutoscalerSettings(min_replica=2, max_replica=1)
    with pytest.raises(ValueError, match="max_scale_down_rate"):
        AutoscalerSettings(max_scale_down_rate=0)
    with pytest.raises(ValueError, match="scale_down_half_life_s"):
        AutoscalerSettings(scale_down_policy="half_life")


def test_settings_from_the_normalized_spec() -> None:
    from bisllm_truss.spec import AutoscalingSpec

    spec = AutoscalingSpec(
        min_replica=2,
        max_replica=6,
        autoscaling_window=120,
        scale_down_delay=600,
        target_in_flight_tokens=30_000,
        scale_down_policy="half_life",
        max_scale_down_rate=None,
        scale_down_half_life_seconds=900,
    )
    s = AutoscalerSettings.from_spec(spec, max_replica=8)
    assert (s.min_replica, s.max_replica, s.window_s, s.scale_down_delay_s) == (2, 8, 120, 600)
    assert (s.target, s.scale_down_policy, s.scale_down_half_life_s) == (30_000, "half_life", 900)


def test_metrics_show_every_field_of_the_decision() -> None:
    registry = CollectorRegistry()
    metrics = AutoscalerMetrics(registry, "m")
    scaler = Autoscaler(settings(window_s=10.0))
    clock = iter(range(100))
    loads = iter([PoolLoad(1000, 2, 1), PoolLoad(3000, 4, 1)])
    planner = Planner(scaler, lambda: next(loads), metrics, clock=lambda: float(next(clock)))
    planner.tick()
    d = planner.tick()
    labels = {"model_name": "m", "pool": "workers"}
    values = {name: registry.get_sample_value(name, labels) for name, _, _ in AUTOSCALER_GAUGES}
    assert values == {
        "autoscaler_in_flight_tokens": 3000,
        "autoscaler_avg_in_flight_tokens": 2000,
        "autoscaler_avg_num_requests": 3,
        "autoscaler_avg_num_workers": 1,
        "autoscaler_desired_scale": 2.0,
        "autoscaler_policy_desired_scale": 2.0,
        "autoscaler_rounded_desired_scale": 2,
    }
    assert d.rounded_desired_scale == 2
    report = planner.report()
    assert report["mode"] == "advisory" and report["replicas"] == 2
    assert report["last_decision"]["desired_scale"] == 2.0


def test_scale_up_is_capped_by_the_healthy_replicas() -> None:
    """A backlog that builds while replicas start cannot ask for more than twice the healthy
    replicas (or four more); the cap grows as they become healthy."""
    scaler = Autoscaler(settings(window_s=1.0, max_replica=64))
    d = feed(scaler, 0, 1, 40_000, workers=1)
    assert d.desired_scale == pytest.approx(40) and d.rounded_desired_scale == 5  # 1 + 4
    d = feed(scaler, 1, 2, 40_000, workers=1)  # nothing healthy yet: hold, no new ask
    assert d.rounded_desired_scale == 5 and scaler.scale_events == 1
    d = feed(scaler, 2, 3, 40_000, workers=5)
    assert d.rounded_desired_scale == 10  # 2 x 5
    d = feed(scaler, 3, 4, 40_000, workers=10)
    assert d.rounded_desired_scale == 20
    d = feed(scaler, 4, 5, 40_000, workers=20)
    assert d.rounded_desired_scale == 40
    uncapped = Autoscaler(settings(window_s=1.0, max_replica=64, max_scale_up_rate=None))
    assert feed(uncapped, 0, 1, 40_000, workers=1).rounded_desired_scale == 40
