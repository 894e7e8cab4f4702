"""How fast one worker is: the step-time model the trace simulator runs its workers on, read
from a JSON profile measured by benchmarks/calibrate_worker.py.

A continuous-batching engine runs in steps. Each step decodes one token for every decoding
request and spends what is left of the step's token budget (`max_num_tokens`) on prefill
chunks. Its wall time is modelled as

    step_s = base_s
           + per_prefill_token_s * prefill_tokens      (the chunks' projections and experts)
           + per_decode_seq_s    * decode_batch        (per decoding request)
           + per_kv_token_s      * kv_tokens           (decoders' contexts, summed)
           + per_padded_pair_s   * padded_pairs        (attention of a step with a prefill)

`padded_pairs` is sequences x longest query x longest KV in a step with any prefill, and 0 in
a pure-decode step. That is how the engine computes such a step's attention (PyTorch SDPA on
a padded rectangle: engine/attention.py), while pure-decode steps use a paged kernel whose
cost follows the contexts. On the embedded CPU model the padding dominates: a 1,024-token
prompt prefilled beside 8 decoding requests takes ~4x its time alone, a 2,040-token prompt
alone ~3x what a linear fit of short prompts predicts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = "embedded-cpu.json"

_FLOAT_FIELDS = (
    "base_s",
    "per_prefill_token_s",
    "per_decode_seq_s",
    "per_kv_token_s",
    "per_padded_pair_s",
    "startup_s",
)
_INT_FIELDS = ("max_batch_size", "max_num_tokens", "kv_capacity_tokens")


class ProfileError(ValueError):
    """A worker profile that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class WorkerProfile:
    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_kv_token_s: float
    per_padded_pair_s: float
    max_batch_size: int  # most requests running at once (prefilling + decoding)
    max_num_tokens: int  # token budget of one step: decodes plus prefill chunks
    kv_capacity_tokens: int  # KV room; a request holds prompt + output tokens from admission
    startup_s: float  # from "start a replica" to "it takes requests"
    # Longest request (prompt + output) the worker serves; longer ones are rejected. None: any.
    max_seq_len: int | None = None
    source: str = ""  # where the numbers came from (machine, model, date, fit quality)
    fit: dict[str, Any] | None = None  # calibration details, kept for the record

    def __post_init__(self) -> None:
        problems = []
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
        for name in _INT_FIELDS:
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            problems.append(f"max_seq_len must be >= 2, got {self.max_seq_len!r}")
        if self.max_num_tokens < self.max_batch_size:
            # Otherwise a full decode batch would leave no budget and prefill would starve.
            problems.append(
                f"max_num_tokens ({self.max_num_tokens}) must be >= max_batch_size "
                f"({self.max_batch_size})"
            )
        if self.base_s <= 0:
            problems.append("the step-time coefficients give a zero-time step; base_s must be > 0")
        if problems:
            raise ProfileError("; ".join(problems))

    def step_s(
        self, prefill_tokens: float, decode_batch: float, kv_tokens: float, padded_pairs: float
    ) -> float:
        """Wall time of one step (see the module docstring); 0 for an empty step."""
        if prefill_tokens == 0 and decode_batch == 0:
            return 0.0
        return (
            self.base_s
            + self.per_prefill_token_s * prefill_tokens
            + self.per_decode_seq_s * decode_batch
            + self.per_kv_token_s * kv_tokens
            + self.per_padded_pair_s * padded_pairs
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["fit"] is None:
            del data["fit"]
        return data


def load_profile(path: str | Path) -> WorkerProfile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data: Any, where: str = "profile") -> WorkerProfile:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(WorkerProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    values: dict[str, Any] = {}
    for name in _FLOAT_FIELDS:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProfileError(f"{where}: field {name!r}: expected a number, got {value!r}")
        values[name] = float(value)
    for name in _INT_FIELDS:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: field {name!r}: expected an integer, got {value!r}")
        values[name] = value
    max_seq_len = data.get("max_seq_len")
    if max_seq_len is not None and (
        isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
    ):
        raise ProfileError(
            f"{where}: field 'max_seq_len': expected an integer or null, got {max_seq_len!r}"
        )
    values["max_seq_len"] = max_seq_len
    source = data.get("source", "")
    if not isinstance(source, str):
        raise ProfileError(f"{where}: field 'source': expected a string, got {source!r}")
    fit = data.get("fit")
    if fit is not None and not isinstance(fit, dict):
        raise ProfileError(f"{where}: field 'fit': expected an object, got {fit!r}")
    try:
        return WorkerProfile(**values, source=source, fit=fit)
    except ProfileError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def default_profile() -> WorkerProfile:
    """The embedded model on a 2-core CPU box (profiles/embedded-cpu.json)."""
    ref = resources.files("bisllm_server.autoscaler") / "profiles" / DEFAULT_PROFILE
    return profile_from_dict(json.loads(ref.read_text(encoding="utf-8")), DEFAULT_PROFILE)


# -- sustainable capacity (the overshoot oracle) --------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """What one replica sustains on a stream of identical mean requests at a TPOT SLO."""

    decode_batch: int  # concurrent decoding requests
    step_s: float  # mean step time, prefill share included (= the TPOT they see)
    requests_per_s: float
    tokens_per_s: float  # prompt + output tokens per second
    meets_tpot: bool  # False when even one request at a time misses the SLO


def sustainable_capacity(
    profile: WorkerProfile, prompt_tokens: float, output_tokens: float, tpot_slo_s: float
) -> Capacity:
    """Per-replica capacity for a stream of requests of `prompt_tokens` in, `output_tokens`
    out (P and O below) at a TPOT SLO.

    In steady state with B requests decoding, a pure-decode step over contexts of mean
    length P + O / 2 takes

        decode_s(B) = step_s(prefill 0, batch B, kv B * (P + O / 2), padded 0)

    and B / O requests finish per step, so as many prompts must be prefilled per step. Each
    rides on one step beside the B decoders (chunked prefill), which it lengthens by

        prefill_s(B) = per_prefill_token_s * P + per_padded_pair_s * (B + 1) * P * max(P, P + O)

    (the padded attention with the longest sequence a request reaches, P + O). A request's
    TPOT is the mean step time

        step_s(B) = decode_s(B) + (B / O) * prefill_s(B).

    A replica finishes rate(B) = B / (O * step_s(B)) requests per second. B is the batch
    (at most max_batch_size, its KV B * (P + O) within kv_capacity_tokens) with the highest
    rate among those with step_s(B) <= tpot_slo_s, or 1 when none meets the SLO. It is not
    simply the largest: the padded prefill grows with B, and on the embedded CPU profile the
    rate peaks at about 10 requests decoding. C is rate(B) * (P + O) tokens per second. The
    share of time spent prefilling is (B / O) * prefill_s(B) / step_s(B).
    """
    if prompt_tokens < 0 or output_tokens < 1:
        raise ValueError("need prompt_tokens >= 0 and output_tokens >= 1")
    p, o = float(prompt_tokens), float(output_tokens)
    per_request = p + o
    limit = max(1, min(profile.max_batch_size, int(profile.kv_capacity_tokens // per_request)))

    def step(batch: int) -> float:
        decode = profile.step_s(0, batch, batch * (p + o / 2), 0)
        padded = (batch + 1) * p * max(p, p + o)
        prefill = profile.per_prefill_token_s * p + profile.per_padded_pair_s * padded
        return decode + batch / o * prefill

    def rate(batch: int) -> float:
        return batch / (o * step(batch))

    best = 1
    for batch in range(1, limit + 1):  # step(B) grows with B: stop at the first miss
        if step(batch) > tpot_slo_s:
            break
        if rate(batch) > rate(best):
            best = batch
    step_time = step(best)
    rate_best = rate(best)
    return Capacity(
        decode_batch=best,
        step_s=step_time,
        requests_per_s=rate_best,
        tokens_per_s=rate_best * per_request,
        meets_tpot=step_time <= tpot_slo_s,
    )
