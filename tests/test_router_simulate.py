"""Trace loading, the router trace simulator and `bisllm bench router`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from bisllm_server.router.simulate import PrefixCache, SimWorkerModel, percentile, simulate
from bisllm_server.router.traces import TraceError, TraceRequest, infer_format, load_trace
from bisllm_truss.cli import main

REPO = Path(__file__).resolve().parents[1]


def _shared_traces() -> Path:
    """The team's shared traces: beside the checkout, or at the workspace's shared folder
    (a clean clone elsewhere, as CI makes)."""
    for root in (REPO.parent / "shared", Path("/work/shared")):
        if (root / "traces").is_dir():
            return root / "traces"
    return REPO.parent / "shared" / "traces"


TRACES = _shared_traces()
MOONCAKE = TRACES / "mooncake_synthetic_trace.jsonl"
AZURE = TRACES / "AzureLLMInferenceTrace_conv_2023.csv"
needs_traces = pytest.mark.skipif(
    not (MOONCAKE.is_file() and AZURE.is_file()),
    reason="the shared traces (data, not in the repository) are not on this machine",
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _mooncake_line(ts: float, inp: int, out: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": ids})


# -- traces ------------------------------------------------------------------------------------


def test_mooncake_keeps_full_blocks_and_converts_ms(tmp_path: Path) -> None:
    lines = [
        _mooncake_line(1000, 1100, 5, [0, 1, 2]),  # 2 full 512-token blocks, 1 partial
        "",
        _mooncake_line(2500, 1024, 7, [0, 1]),  # exactly 2 full blocks
        _mooncake_line(3000, 100, 1, [9]),  # only a partial block
    ]
    path = _write(tmp_path / "t.jsonl", "\n".join(lines) + "\n")
    trace = load_trace(path)
    assert trace == [
        TraceRequest(0.0, 1100, 5, [0, 1]),
        TraceRequest(1.5, 1024, 7, [0, 1]),
        TraceRequest(2.0, 100, 1, []),
    ]
    assert [r.arrival_s for r in load_trace(path, speed=2.0)] == [0.0, 0.75, 1.0]
    assert len(load_trace(path, limit=2)) == 2
    # A bigger trace block size (a different engine's) makes fewer blocks full.
    assert load_trace(path, block_size=1024, limit=1)[0].block_ids == [0]


def test_azure_parses_seven_digit_timestamps_without_trailing_newline(tmp_path: Path) -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,1100,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:46.6805901,2048,3"  # no newline at the end
    )
    trace = load_trace(_write(tmp_path / "a.csv", text))
    assert [r.input_tokens for r in trace] == [1100, 396, 2048]
    assert [r.output_tokens for r in trace] == [44, 109, 3]
    assert trace[0].arrival_s == 0.0
    assert trace[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert trace[2].arrival_s == pytest.approx(60.0000001, abs=1e-6)
    # Full 512-token blocks only, and no id is shared between requests.
    assert [len(r.block_ids) for r in trace] == [2, 0, 4]
    ids = [b for r in trace for b in r.block_ids]
    assert len(ids) == len(set(ids))


def test_azure_timestamp_offsets(tmp_path: Path) -> None:
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-12 00:00:00.5+00:00,10,1\n"
        "2024-05-12 02:00:01+02:00,10,1\n"
    )
    trace = load_trace(_write(tmp_path / "a.csv", text))
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 0.5])


def test_format_from_suffix(tmp_path: Path) -> None:
    assert infer_format(Path("x.jsonl")) == "mooncake"
    assert infer_format(Path("x.CSV")) == "azure"
    with pytest.raises(TraceError, match=r"x\.txt: cannot tell the trace format"):
        infer_format(Path("x.txt"))
    # An explicit format wins over the suffix.
    path = _write(tmp_path / "t.txt", _mooncake_line(0, 10, 1, []) + "\n")
    assert len(load_trace(path, "mooncake")) == 1


@pytest.mark.parametrize(
    ("suffix", "text", "match"),
    [
        (".jsonl", _mooncake_line(0, 10, 1, []) + "\n{oops\n", r"t\.jsonl:2: not valid JSON"),
        (".jsonl", "[1, 2]\n", r"t\.jsonl:1: expected a JSON object"),
        (
            ".jsonl",
            '{"timestamp": 0, "output_length": 1, "hash_ids": []}\n',
            r"t\.jsonl:1: field 'input_length': expected an integer >= 0, got None",
        ),
        (
            ".jsonl",
            _mooncake_line(-5, 10, 1, []) + "\n",
            r"t\.jsonl:1: field 'timestamp': expected a number >= 0",
        ),
        (
            ".jsonl",
            '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": ["a"]}\n',
            r"t\.jsonl:1: field 'hash_ids': expected a list of integers",
        ),
        (
            ".jsonl",
            _mooncake_line(0, 2048, 1, [1, 2]) + "\n",
            r"t\.jsonl:1: field 'hash_ids': 2 ids for 2048 input tokens, fewer than the 4 full",
        ),
        (
            ".csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,1,1\nyesterday,1,1\n",
            r"t\.csv:3: field 'TIMESTAMP': expected YYYY-MM-DD HH:MM:SS",
        ),
        (
            ".csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,12x,1\n",
            r"t\.csv:2: field 'ContextTokens': expected an integer >= 0, got '12x'",
        ),
        (
            ".csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,1\n",
            r"t\.csv:2: 2 fields, the header has 3",
        ),
        (".csv", "TIMESTAMP,Context,GeneratedTokens\n", r"t\.csv:1: header lacks ContextTokens"),
        (
            ".csv",
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-02-30 18:15:46,1,1\n",
            r"t\.csv:2: field 'TIMESTAMP'",
        ),
    ],
)
def test_malformed_traces_name_file_line_and_field(
    tmp_path: Path, suffix: str, text: str, match: str
) -> None:
    with pytest.raises(TraceError, match=match):
        load_trace(_write(tmp_path / f"t{suffix}", text))


@needs_traces
def test_real_traces_row_counts() -> None:
    mooncake = load_trace(MOONCAKE)
    azure = load_trace(AZURE)
    assert len(mooncake) == 3993
    assert len(azure) == 19366
    assert mooncake[-1].arrival_s == pytest.approx(1022.025)
    assert 3400 < azure[-1].arrival_s < 3600
    assert all(len(r.block_ids) == r.input_tokens // 512 for r in mooncake)


# -- the simulated cache -----------------------------------------------------------------------


def test_prefix_cache_evicts_leaves_lru_first() -> None:
    cache = PrefixCache(capacity_tokens=5 * 16, block_size=16)
    cache.reserve(3 * 16)  # a request prefills 1-2-3...
    cache.store([1, 2, 3], None)
    cache.unpin([1, 2, 3])  # ...and finishes: LRU order 3, 2, 1 (leaf first)
    cache.pin([1])  # the next one hits block 1 and adds 4 below it
    cache.reserve(16)
    cache.store([4], 1)
    cache.unpin([1, 4])  # LRU order 3, 2, 4, 1
    assert cache.used_tokens == 4 * 16
    assert cache.make_room(2 * 16) == [3]  # one block must go: the oldest leaf
    assert cache.make_room(3 * 16) == [2]
    assert cache.make_room(4 * 16) == [4]  # 1 outlives its children: a parent goes last
    assert cache.blocks() == {1}
    cache.pin([1])
    assert cache.evictable_tokens([]) == 0  # pinned blocks never go
    assert cache.evicted == 3


# -- the simulation ----------------------------------------------------------------------------

BLOCK = 16


def _request(arrival: float, prefix: list[int], unique: list[int], out: int = 8) -> TraceRequest:
    ids = prefix + unique
    return TraceRequest(arrival, len(ids) * BLOCK + 5, out, ids)  # +5: a partial last block


def _grouped_trace(
    n: int, groups: int, prefix_blocks: int, rate: float, seed: int = 0
) -> list[TraceRequest]:
    """`n` requests, each a random group's shared prefix plus a few blocks of its own."""
    rng = random.Random(seed)
    prefixes = [[g * 10_000 + i for i in range(prefix_blocks)] for g in range(groups)]
    trace, now = [], 0.0
    for i in range(n):
        now += rng.expovariate(rate)
        unique = [1_000_000 + i * 10 + j for j in range(rng.randrange(1, 5))]
        trace.append(_request(now, prefixes[rng.randrange(groups)], unique))
    return trace


def _model(**kw: float) -> SimWorkerModel:
    values = dict(kv_capacity_tokens=100_000, prefill_tokens_per_s=10_000, decode_tokens_per_s=100)
    values.update(kw)
    return SimWorkerModel(**values, block_size=BLOCK)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["kv", "round_robin", "least_load"])
def test_invariants(policy: str) -> None:
    trace = _grouped_trace(150, groups=6, prefix_blocks=40, rate=8.0)
    model = _model(kv_capacity_tokens=3_000)
    result = simulate(trace, policy, 3, model, seed=1)  # type: ignore[arg-type]
    assert result.requests == len(trace)
    assert result.evicted_blocks > 0  # the cache is under pressure...
    assert result.peak_kv_tokens <= model.kv_capacity_tokens  # ...and never overflows
    assert result.hit_rate <= result.best_hit_rate
    for o in result.outcomes:
        # The router saw every block a prefill finds: reported, or predicted from routing.
        assert o.cached_tokens <= o.best_cached_tokens
        assert o.ttft_s >= max(1, o.input_tokens - o.cached_tokens) / 10_000 - 1e-9
    assert sum(result.routed_per_worker) == len(trace)
    assert result.ttft_p50_s <= result.ttft_p99_s
    assert result.imbalance >= 1.0
    data = result.to_dict()
    assert "outcomes" not in data
    json.dumps(data)


def test_one_shared_prefix_kv_beats_round_robin() -> None:
    # Requests far enough apart that load plays no part: only where the prefix is cached does.
    prefix = list(range(64))
    trace = [_request(10.0 * i, prefix, [1000 + i]) for i in range(8)]
    kv = simulate(trace, "kv", 4, _model(), seed=0)
    rr = simulate(trace, "round_robin", 4, _model(), seed=0)
    # kv misses once, round-robin once per worker.
    assert kv.hit_rate == pytest.approx(7 * 64 * BLOCK / sum(r.input_tokens for r in trace))
    assert rr.hit_rate == pytest.approx(4 * 64 * BLOCK / sum(r.input_tokens for r in trace))
    assert kv.routed_per_worker.count(0) == 3
    assert kv.ttft_mean_s < rr.ttft_mean_s


def test_kv_partitions_prefixes_when_the_cache_is_small() -> None:
    # 12 long prefixes, room for about 2 per worker: kv keeps each group on a few workers,
    # while round-robin makes every worker cycle through all 12 and thrash.
    trace = _grouped_trace(300, groups=12, prefix_blocks=60, rate=4.0, seed=4)
    model = _model(kv_capacity_tokens=2 * 64 * BLOCK + 1_000)
    kv = simulate(trace, "kv", 4, model, seed=0)
    rr = simulate(trace, "round_robin", 4, model, seed=0)
    assert kv.hit_rate > 0.7
    assert kv.hit_rate > 2.5 * rr.hit_rate


def test_router_queue_threshold_holds_requests() -> None:
    trace = _grouped_trace(60, groups=3, prefix_blocks=20, rate=50.0)
    result = simulate(trace, "kv", 2, _model(), config_overrides={"router_queue_threshold": 0.01})
    assert result.requests == len(trace)


def test_request_larger_than_the_cache_is_an_error() -> None:
    trace = [_request(0.0, list(range(10)), [])]
    with pytest.raises(ValueError, match="raise the KV capacity"):
        simulate(trace, "kv", 1, _model(kv_capacity_tokens=100))


def test_percentile() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_bench_router_json(tmp_path: Path) -> None:
    # A Mooncake-format trace of its own: 30 shared documents, 400 requests over 100 s.
    rng = random.Random(7)
    lines = []
    for i in range(400):
        doc = rng.randrange(30)
        shared = [doc * 100 + k for k in range(rng.randrange(2, 12))]
        own = [10_000 + i * 10 + k for k in range(rng.randrange(0, 3))]
        ids = shared + own
        lines.append(_mooncake_line(i * 250, len(ids) * 512, rng.randrange(1, 40), ids))
    trace = _write(tmp_path / "trace.jsonl", "\n".join(lines) + "\n")
    args = ["bench", "router", "--trace", str(trace), "--limit", "300", "--workers", "4"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert "hit rate" in result.stdout
    data = json.loads(lines[-1])
    for key in (
        "hit_rate",
        "best_hit_rate",
        "imbalance",
        "ttft_p50_s",
        "ttft_p99_s",
        "decision_p99_ms",
        "efficiency",
        "requests",
        "policy",
        "workers",
    ):
        assert key in data, key
    assert data["requests"] == 300
    assert data["policy"] == "kv"
    assert data["workers"] == 4
    assert 0 < data["hit_rate"] <= data["best_hit_rate"] <= 1


def test_cli_bench_router_reports_bad_traces(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", "{nope\n")
    result = CliRunner().invoke(main, ["bench", "router", "--trace", str(path)])
    assert result.exit_code == 1
    assert "bad.jsonl:1: not valid JSON" in result.output
