"""The autoscaling policy: load samples in, a replica count out. No clocks, processes or HTTP:
the local actuator (`bisllm serve --autoscale`) and the trace simulator (`bisllm bench
autoscaler`) feed it the same way, so what the simulator shows is what the deployment does.

Each `decide(now)`:

1. **Window.** The samples of the last `window_s` seconds are averaged (a plain mean: samples
   come at a fixed tick). Before a full window has passed, whatever samples exist are averaged.
2. **Target division.** `desired_scale = average signal / target`: in-flight tokens over
   `target_in_flight_tokens` for the token policy, requests over the concurrency target for the
   concurrency policy. The division does not involve how many replicas are up, so replicas that
   are still starting count as capacity: a burst asks for what it needs once, instead of asking
   again every tick while the new replicas load (BIS-LLM's documented overshoot, which comes
   from dividing by healthy replicas only).
3. **Bounds.** The recommendation is clamped to [`min_replica`, `max_replica`]; `min_replica`
   is at least 1 (no scale to zero).
4. **Scale up** at once: when the rounded recommendation exceeds the replicas already asked
   for (ready or starting), the recommendation is the policy's answer, capped at
   `max_scale_up_rate` times the healthy replicas or `scale_up_min_step` more than them,
   whichever is more (the HPA's default: 100% or 4 pods). The cap bounds the other overshoot:
   while new replicas start, requests queue, the queued prompts raise the signal, and an
   uncapped policy would ask for replicas to serve a backlog the starting ones will clear.
5. **Scale down** only when it is safe and gradual:
   - *delay*: the highest recommendation over the last `scale_down_delay_s` must be below the
     current count (Kubernetes HPA's scale-down stabilisation), and at least that long must have
     passed since the last change;
   - *rate* (default): one step removes at most `max_scale_down_rate` percent of the replicas,
     and at least one;
   - *half-life*: the count may fall no faster than `current × 0.5^(elapsed / half_life)`,
     elapsed since the last change (an exponential decay of the replica count).
6. **Rounding.** A recommendation rounds up to the next whole replica, except that one at
   most `rounding_slack` (0.1) above a whole number rounds down to it: 2.1 replicas' worth of
   load runs on 2, 2.11 on 3. The slack keeps noise just above a whole number from adding a
   replica. A gradual step's floor (the rate or the decay curve) is never undercut: it rounds
   up. The result is clamped to the bounds again.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

Signal = Literal["tokens", "concurrency"]
ScaleDownPolicy = Literal["rate", "half_life"]


@dataclass(frozen=True)
class AutoscalerSettings:
    min_replica: int = 1
    max_replica: int = 1
    window_s: float = 300.0
    scale_down_delay_s: float = 300.0
    target: float = 50_000.0  # per replica, in the signal's unit (tokens or requests)
    signal: Signal = "tokens"
    scale_down_policy: ScaleDownPolicy = "rate"
    max_scale_down_rate: float = 20.0  # percent of the replicas per step
    scale_down_half_life_s: float | None = None
    rounding_slack: float = 0.1
    # Scale-up cap: at most this many times the healthy replicas, or that many plus
    # `scale_up_min_step`, whichever is more (HPA's default: 100% or 4 pods). None: no cap.
    max_scale_up_rate: float | None = 2.0
    scale_up_min_step: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.min_replica < 1:
            problems.append(
                f"min_replica must be at least 1 (no scale to zero), got {self.min_replica}"
            )
        if self.max_replica < self.min_replica:
            problems.append(
                f"max_replica ({self.max_replica}) must be >= min_replica ({self.min_replica})"
            )
        if self.window_s <= 0:
            problems.append(f"window_s must be positive, got {self.window_s}")
        if self.scale_down_delay_s < 0:
            problems.append(f"scale_down_delay_s must be >= 0, got {self.scale_down_delay_s}")
        if self.target <= 0:
            problems.append(f"target must be positive, got {self.target}")
        if self.scale_down_policy == "rate" and not 0 < self.max_scale_down_rate <= 100:
            problems.append(
                f"max_scale_down_rate must be in (0, 100], got {self.max_scale_down_rate}"
            )
        if self.scale_down_policy == "half_life" and not (self.scale_down_half_life_s or 0) > 0:
            problems.append("scale_down_half_life_s must be positive with the half_life policy")
        if not 0 <= self.rounding_slack < 1:
            problems.append(f"rounding_slack must be in [0, 1), got {self.rounding_slack}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_spec(cls, spec: Any, **overrides: Any) -> AutoscalerSettings:
        """From the normalized spec's `autoscaling` block (bisllm_truss.spec.AutoscalingSpec)."""
        values: dict[str, Any] = dict(
            min_replica=spec.min_replica,
            max_replica=spec.max_replica,
            window_s=float(spec.autoscaling_window),
            scale_down_delay_s=float(spec.scale_down_delay),
            target=float(spec.target_in_flight_tokens),
            scale_down_policy=spec.scale_down_policy,
        )
        if spec.scale_down_policy == "half_life":
            values["scale_down_half_life_s"] = float(spec.scale_down_half_life_seconds)
        else:
            values["max_scale_down_rate"] = float(spec.max_scale_down_rate)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One reading of a pool: summed over its workers (plus what the router holds queued)."""

    time: float
    in_flight_tokens: float
    num_requests: float
    num_workers: int  # healthy workers serving now (not starting, not draining)


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """One decision, with every intermediate the autoscaler_* metrics show."""

    time: float
    in_flight_tokens: float  # the latest sample
    avg_in_flight_tokens: float
    avg_num_requests: float
    avg_num_workers: float
    desired_scale: float  # average signal / target, before any policy
    policy_desired_scale: float  # after bounds, delay and gradual scale-down
    rounded_desired_scale: int  # the replica count asked for
    previous_scale: int

    @property
    def changed(self) -> bool:
        return self.rounded_desired_scale != self.previous_scale


class Autoscaler:
    def __init__(self, settings: AutoscalerSettings, initial_replicas: int | None = None) -> None:
        self.settings = settings
        start = settings.min_replica if initial_replicas is None else initial_replicas
        self.current = min(max(start, settings.min_replica), settings.max_replica)
        self.last_change: float | None = None  # time of the last change of `current`
        self.scale_events = 0
        self._samples: deque[LoadSample] = deque()
        self._sums = [0.0, 0.0, 0.0]  # in-flight tokens, requests, workers over the window
        self._recommendations: deque[tuple[float, float]] = deque()  # (time, clamped desired)
        self._first_time: float | None = None
        self.last: ScaleDecision | None = None

    # -- inputs --------------------------------------------------------------------------------

    def observe(self, sample: LoadSample) -> None:
        if self._samples and sample.time < self._samples[-1].time:
            raise ValueError(f"sample at {sample.time} is older than the last one")
        if self._first_time is None:
            self._first_time = sample.time
        self._samples.append(sample)
        self._sums[0] += sample.in_flight_tokens
        self._sums[1] += sample.num_requests
        self._sums[2] += sample.num_workers

    def _expire(self, now: float) -> None:
        horizon = now - self.settings.window_s
        # Keep the newest sample even if it is old: a stalled feed holds the last reading.
        while len(self._samples) > 1 and self._samples[0].time <= horizon:
            old = self._samples.popleft()
            self._sums[0] -= old.in_flight_tokens
            self._sums[1] -= old.num_requests
            self._sums[2] -= old.num_workers
        keep_from = now - self.settings.scale_down_delay_s
        while self._recommendations and self._recommendations[0][0] < keep_from:
            self._recommendations.popleft()

    # -- the decision ----------------------------------------------------------------------------

    def decide(self, now: float) -> ScaleDecision:
        s = self.settings
        self._expire(now)
        count = len(self._samples)
        avg_tokens = self._sums[0] / count if count else 0.0
        avg_requests = self._sums[1] / count if count else 0.0
        avg_workers = self._sums[2] / count if count else 0.0
        signal = avg_tokens if s.signal == "tokens" else avg_requests
        desired = signal / s.target
        recommendation = min(max(desired, s.min_replica), s.max_replica)
        self._recommendations.append((now, recommendation))

        previous = self.current
        if self._round(recommendation) > previous:
            policy = recommendation
            if s.max_scale_up_rate is not None and self._samples:
                ready = self._samples[-1].num_workers
                cap = max(math.ceil(ready * s.max_scale_up_rate), ready + s.scale_up_min_step)
                policy = max(min(policy, float(cap)), float(previous))
            rounded = self._round(policy)
        else:
            policy = self._scale_down(now, previous)
            rounded = math.ceil(policy - 1e-9)  # the floor of a gradual step is never undercut
        rounded = min(max(rounded, s.min_replica), s.max_replica)
        if rounded != previous:
            self.current = rounded
            self.last_change = now
            self.scale_events += 1
        latest = self._samples[-1].in_flight_tokens if self._samples else 0.0
        self.last = ScaleDecision(
            time=now,
            in_flight_tokens=latest,
            avg_in_flight_tokens=avg_tokens,
            avg_num_requests=avg_requests,
            avg_num_workers=avg_workers,
            desired_scale=desired,
            policy_desired_scale=policy,
            rounded_desired_scale=rounded,
            previous_scale=previous,
        )
        return self.last

    def _scale_down(self, now: float, current: int) -> float:
        """The policy's answer when the load does not call for more replicas: `current`, or a
        gradual step down once the delay allows it."""
        s = self.settings
        since = self.last_change if self.last_change is not None else self._first_time
        elapsed = now - (since if since is not None else now)
        # The highest recommendation over the delay: scale down only to what every recent
        # reading would have accepted.
        stabilized = max(r for _, r in self._recommendations)
        if stabilized >= current or elapsed < s.scale_down_delay_s:
            return float(current)
        if s.scale_down_policy == "half_life":
            assert s.scale_down_half_life_s is not None
            floor = current * 0.5 ** (elapsed / s.scale_down_half_life_s)
        else:
            floor = current - max(1, math.floor(current * s.max_scale_down_rate / 100))
        return max(float(self._round(stabilized)), floor)

    def _round(self, value: float) -> int:
        return max(0, math.ceil(value - self.settings.rounding_slack))
