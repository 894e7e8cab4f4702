"""Request traces for replaying against the router (`bisllm bench router`).

Two public formats (see /work/shared/traces/README.md):

- mooncake: JSONL, one request per line, `{"timestamp" (ms), "input_length", "output_length",
  "hash_ids"}`. `hash_ids` are chained ids of the prompt's 512-token blocks, the last one
  possibly partial. Only full blocks are kept: an engine never caches a partial block, so the
  router can neither find nor publish one.
- azure: CSV with header `TIMESTAMP,ContextTokens,GeneratedTokens` and wall-clock timestamps
  with up to 7 fractional digits. It carries no prefix information, so every request gets
  block ids of its own and nothing is shared.

Every malformed row raises `TraceError` naming the file, line and field.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

TraceFormat = Literal["mooncake", "azure"]
FORMATS: tuple[TraceFormat, ...] = ("mooncake", "azure")
DEFAULT_TRACE_BLOCK_SIZE = 512  # the Mooncake traces' hash_ids block size

_SUFFIX_FORMATS: dict[str, TraceFormat] = {".jsonl": "mooncake", ".csv": "azure"}
_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# `YYYY-MM-DD HH:MM:SS[.fraction][Z|±HH:MM]`: the 2023 files have 7 fractional digits (more
# than datetime's microseconds), the 2024 ones 6 and a UTC offset.
_TIMESTAMP = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?"
)


class TraceError(ValueError):
    """A trace file that cannot be read as the format it claims to be."""


@dataclass(slots=True)
class TraceRequest:
    arrival_s: float  # seconds after the trace's first request
    input_tokens: int
    output_tokens: int
    block_ids: list[int]  # chained ids of the prompt's full blocks, in order


def infer_format(path: Path) -> TraceFormat:
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(f"{s} ({f})" for s, f in _SUFFIX_FORMATS.items())
        raise TraceError(f"{path}: cannot tell the trace format from the suffix; use {known}")
    return fmt


def load_trace(
    path: str | Path,
    fmt: TraceFormat | None = None,
    *,
    block_size: int = DEFAULT_TRACE_BLOCK_SIZE,
    limit: int | None = None,
    speed: float = 1.0,
) -> list[TraceRequest]:
    """The trace's first `limit` requests (all when None), in arrival order, arrivals relative
    to the first request and divided by `speed` (2.0 replays twice as fast)."""
    path = Path(path)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fmt = fmt or infer_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; use one of {', '.join(FORMATS)}")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = (
                _mooncake(path, f, block_size) if fmt == "mooncake" else _azure(path, f, block_size)
            )
            requests = list(itertools.islice(rows, limit))
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    # A simulation replays arrivals in time order; a stable sort keeps file order for ties.
    requests.sort(key=lambda r: r.arrival_s)
    origin = requests[0].arrival_s if requests else 0.0
    for r in requests:
        r.arrival_s = (r.arrival_s - origin) / speed
    return requests


# -- mooncake ------------------------------------------------------------------------------------


def _mooncake(path: Path, lines: Any, block_size: int) -> Iterator[TraceRequest]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(row).__name__}")
        timestamp = _number(where, row, "timestamp")
        input_tokens = _count(where, row, "input_length")
        output_tokens = _count(where, row, "output_length")
        hash_ids = row.get("hash_ids")
        if not isinstance(hash_ids, list) or not all(_is_int(h) for h in hash_ids):
            raise TraceError(f"{where}: field 'hash_ids': expected a list of integers")
        full = input_tokens // block_size
        if len(hash_ids) < full:
            raise TraceError(
                f"{where}: field 'hash_ids': {len(hash_ids)} ids for {input_tokens} input tokens, "
                f"fewer than the {full} full blocks of {block_size}; is the trace block size right?"
            )
        yield TraceRequest(timestamp / 1000.0, input_tokens, output_tokens, hash_ids[:full])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(where: str, row: dict, field: str) -> float:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise TraceError(f"{where}: field {field!r}: expected a number >= 0, got {value!r}")
    return float(value)


def _count(where: str, row: dict, field: str) -> int:
    value = row.get(field)
    if not _is_int(value) or value < 0:
        raise TraceError(f"{where}: field {field!r}: expected an integer >= 0, got {value!r}")
    return value


# -- azure ---------------------------------------------------------------------------------------


def _azure(path: Path, f: Any, block_size: int) -> Iterator[TraceRequest]:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        return
    columns = [c.strip() for c in header]
    missing = [c for c in _AZURE_COLUMNS if c not in columns]
    if missing:
        raise TraceError(
            f"{path}:1: header lacks {', '.join(missing)}; expected {','.join(_AZURE_COLUMNS)}"
        )
    at = {c: columns.index(c) for c in _AZURE_COLUMNS}
    next_block = 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise TraceError(f"{where}: {len(row)} fields, the header has {len(columns)}")
        arrival = _epoch_seconds(where, row[at["TIMESTAMP"]])
        input_tokens = _csv_count(where, "ContextTokens", row[at["ContextTokens"]])
        output_tokens = _csv_count(where, "GeneratedTokens", row[at["GeneratedTokens"]])
        # Fresh ids per request: the trace says nothing about shared prefixes, so none are.
        full = input_tokens // block_size
        yield TraceRequest(
            arrival, input_tokens, output_tokens, list(range(next_block, next_block + full))
        )
        next_block += full


def _csv_count(where: str, field: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise TraceError(f"{where}: field {field!r}: expected an integer >= 0, got {text!r}")
    return value


def _epoch_seconds(where: str, text: str) -> float:
    """Seconds since the epoch; parsed by hand because strptime's %f takes at most 6 digits."""
    match = _TIMESTAMP.fullmatch(text.strip())
    stamp = None
    if match:
        try:
            stamp = datetime.strptime(match["base"].replace("T", " "), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            stamp = None
    if match is None or stamp is None:
        raise TraceError(
            f"{where}: field 'TIMESTAMP': expected YYYY-MM-DD HH:MM:SS[.fraction], got {text!r}"
        )
    offset = timedelta(0)
    tz = match["tz"]
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        offset = sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    seconds = (stamp.replace(tzinfo=timezone.utc) - offset).timestamp()
    frac = match["frac"]
    return seconds + (int(frac) / 10 ** len(frac) if frac else 0.0)
