"""Scheduler, KV accounting and engine API on the checksum model (no real weights needed)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_fakes import EOS, ChecksumModel, checksum_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bisllm_server.engine.async_engine import AsyncEngine
from bisllm_server.engine.config import EngineConfig, EngineConfigError
from bisllm_server.engine.engine import LLMEngine, RequestError
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64


def make_engine(**overrides) -> LLMEngine:
    settings_ = dict(
        model="checksum",
        page_size=4,
        num_kv_pages=256,
        max_batch_size=8,
        max_num_tokens=64,
        max_seq_len=256,
    )
    settings_.update(overrides)
    eos_every = settings_.pop("eos_every", 0)
    return LLMEngine(
        EngineConfig(**settings_),
        model=ChecksumModel(VOCAB, eos_every=eos_every),
        model_config=checksum_config(VOCAB),
        tokenizer=None,
    )


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def assert_pages_accounted(engine: LLMEngine) -> None:
    cached = engine.cache.cached_pages if engine.cache is not None else 0
    held = engine.scheduler.pages_held_by_requests()
    assert engine.allocator.num_free + cached + held == engine.num_kv_pages
    if engine.cache is not None:
        engine.cache.check_invariants()


def run_all(engine: LLMEngine, check=assert_pages_accounted) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        check(engine)
    return tokens


PREFIXES = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25], [30, 31]]


@st.composite
def programs(draw):
    """A random interleaving of adds, aborts and steps over prompts that share prefixes."""
    ops = []
    for i in range(draw(st.integers(1, 10))):
        prefix = draw(st.sampled_from([*PREFIXES, []]))
        suffix = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=14))
        ops.append(("add", f"r{i}", prefix + suffix, draw(st.integers(1, 30))))
        ops.extend(("step",) for _ in range(draw(st.integers(0, 4))))
        if draw(st.booleans()) and draw(st.booleans()):
            ops.append(("abort", f"r{draw(st.integers(0, i))}"))
    return ops


# Thousands of random workloads (about 20 s); small pools make eviction and retraction common.
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=programs(),
    num_pages=st.integers(10, 20),
    budget=st.integers(4, 24),
    batch_size=st.integers(1, 6),
    chunked=st.booleans(),
    prefix_caching=st.booleans(),
    policy=st.sampled_from(["fcfs", "lpm"]),
)
def test_random_workloads_free_every_page_and_match_an_unconstrained_run(
    program, num_pages, budget, batch_size, chunked, prefix_caching, policy
):
    tight = make_engine(
        num_kv_pages=num_pages,
        max_num_tokens=budget if chunked else 64,
        max_batch_size=batch_size,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=prefix_caching,
        schedule_policy=policy,
        max_seq_len=40,
        eos_every=11,
    )
    tokens: dict[str, list[int]] = {}
    finished: dict[str, str] = {}
    requests = {}
    for op in program:
        if op[0] == "add":
            _, rid, prompt, max_tokens = op
            requests[rid] = (prompt, max_tokens)
            tight.add_request(prompt, greedy(max_tokens), request_id=rid)
        elif op[0] == "abort":
            tight.abort(op[1])
        else:
            for out in tight.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    finished[out.request_id] = out.finish_reason
            assert_pages_accounted(tight)
    while tight.has_unfinished_requests():
        for out in tight.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
        assert_pages_accounted(tight)

    assert set(finished) == set(requests), "every request ends exactly once"
    tight.reset_prefix_cache()
    assert tight.allocator.num_free == tight.num_kv_pages

    roomy = make_engine(max_seq_len=40, eos_every=11, max_num_tokens=512, max_batch_size=16)
    for rid, (prompt, max_tokens) in requests.items():
        roomy.add_request(prompt, greedy(max_tokens), request_id=rid)
    expected = run_all(roomy)
    for rid in requests:
        got = tokens.get(rid, [])
        if finished[rid] == "abort":
            assert got == expected[rid][: len(got)]
        else:
            assert got == expected[rid], rid


def test_tiny_pool_retracts_and_resumes_without_losing_tokens():
    prompts = [[1 + i, 2, 3, 4, 5, 6, 7, 8] for i in range(6)]
    tight = make_engine(num_kv_pages=12, max_batch_size=6)
    roomy = make_engine()
    for engine in (tight, roomy):
        for i, p in enumerate(prompts):
            engine.add_request(p, greedy(24, ignore_eos=True), request_id=f"r{i}")
    got, expected = run_all(tight), run_all(roomy)
    assert tight.stats.num_retractions_total > 0
    assert got == expected
    assert all(len(t) == 24 for t in got.values())


def test_chunked_prefill_mixes_with_decode_within_the_token_budget():
    engine = make_engine(max_num_tokens=8)
    engine.add_request([1, 2, 3], greedy(20, ignore_eos=True), request_id="short")
    engine.step()
    engine.add_request(list(range(1, 41)), greedy(4, ignore_eos=True), request_id="long")
    mixed = 0
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.stats
        assert stats.prefill_tokens + stats.decode_tokens <= 8
        if stats.prefill_tokens and stats.decode_tokens:
            mixed += 1
    assert mixed >= 4  # the 40-token prompt went through in chunks next to the decode


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    engine = make_engine(max_num_tokens=16, enable_chunked_prefill=False)
    with pytest.raises(RequestError, match="max_num_tokens"):
        engine.add_request(list(range(1, 30)), greedy(2))
    engine.add_request(list(range(1, 12)), greedy(3, ignore_eos=True), request_id="a")
    engine.add_request(list(range(1, 12)), greedy(3, ignore_eos=True), request_id="b")
    engine.step()
    assert engine.stats.prefill_tokens == 11 and engine.stats.num_waiting == 1
    assert run_all(engine)


def test_prefix_cache_hits_are_reported_and_reused():
    engine = make_engine()
    prompt = list(range(1, 23))
    first = engine.generate([prompt], greedy(5))[0]
    second = engine.generate([prompt], greedy(5))[0]
    assert first.num_cached_tokens == 0
    # Page-aligned and at least one token left to compute: 22 tokens → 5 pages of 4 = 20.
    assert second.num_cached_tokens == 20
    assert second.token_ids == first.token_ids
    assert engine.stats.cached_tokens_total == 20


def test_kv_events_mirror_the_cache():
    engine = make_engine(num_kv_pages=16)
    stored: set[int] = set()

    def on_event(event):
        if isinstance(event, BlockStored):
            stored.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            stored.difference_update(event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            stored.clear()

    engine.kv_events.subscribe(on_event)
    for i in range(6):
        engine.generate([[i + 1, *range(10, 30)]], greedy(3, ignore_eos=True))
    assert len(stored) == engine.cache.cached_pages > 0
    engine.reset_prefix_cache()
    assert not stored


def test_abort_frees_everything_at_once():
    engine = make_engine(enable_prefix_caching=False)
    engine.add_request(list(range(1, 30)), greedy(50, ignore_eos=True), request_id="x")
    engine.step()
    engine.step()
    assert engine.allocator.num_free < engine.num_kv_pages
    engine.abort("x")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("x", "abort")]
    assert engine.allocator.num_free == engine.num_kv_pages
    assert not engine.has_unfinished_requests()


def test_stop_conditions():
    engine = make_engine(max_seq_len=20)
    reference = engine.generate([[3, 4, 5]], greedy(8, ignore_eos=True))[0].token_ids
    stop_at = reference[3]
    (out,) = engine.generate([[3, 4, 5]], greedy(8, ignore_eos=True, stop_token_ids=[stop_at]))
    assert out.token_ids == reference[: reference.index(stop_at) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    (out,) = engine.generate([list(range(1, 16))], greedy(50, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 5  # max_seq_len 20


def test_eos_ends_a_request_unless_ignored_or_before_min_tokens():
    engine = make_engine(eos_every=3)
    prompts = [[i, i + 1] for i in range(1, 30)]
    outs = engine.generate(prompts, greedy(12))
    ended = [o for o in outs if o.finish_reason == "stop"]
    assert ended and all(o.token_ids[-1] == EOS for o in ended)
    early = min(ended, key=lambda o: len(o.token_ids))
    idx = outs.index(early)
    (forced,) = engine.generate([prompts[idx]], greedy(12, min_tokens=len(early.token_ids) + 1))
    assert len(forced.token_ids) > len(early.token_ids)
    assert EOS not in forced.token_ids[: len(early.token_ids)]


def test_in_flight_tokens_count_uncached_prefill_and_full_decode_sequences():
    engine = make_engine(max_num_tokens=10)
    engine.generate([list(range(1, 13))], greedy(1))  # caches 2 pages (8 tokens)
    engine.add_request(list(range(1, 13)), greedy(5, ignore_eos=True), request_id="hit")
    engine.step()  # 12 tokens, 8 cached: 4 computed in one go, first token sampled
    assert engine.stats.cached_tokens == 8
    assert engine.stats.in_flight_tokens == 13  # decoding: 12 prompt + 1 output
    engine.add_request(list(range(40, 60)), greedy(5, ignore_eos=True), request_id="cold")
    engine.step()  # hit decodes (1 token), cold prefills 9 of its 20 tokens
    assert engine.stats.in_flight_tokens == 14 + 20


def test_in_flight_tokens_count_queued_prompts():
    engine = make_engine(max_batch_size=1)
    engine.add_request(list(range(1, 13)), greedy(3, ignore_eos=True), request_id="running")
    engine.add_request(list(range(20, 27)), greedy(3, ignore_eos=True), request_id="queued")
    engine.step()  # one row: "running" prefills and samples its first token
    assert engine.scheduler.num_unfinished == 2 and len(engine.scheduler.waiting) == 1
    assert engine.stats.in_flight_tokens == 13 + 7
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats.in_flight_tokens == 0


def test_request_validation_names_the_field():
    engine = make_engine(num_kv_pages=4)
    with pytest.raises(RequestError, match="prompt: must contain"):
        engine.add_request([])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request([VOCAB + 5])
    with pytest.raises(RequestError, match="KV pages"):
        engine.add_request([1] * 10, greedy(100))
    with pytest.raises(RequestError, match="no tokenizer"):
        engine.add_request("text prompt")
    engine.add_request([1], greedy(2), request_id="dup")
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([1], greedy(2), request_id="dup")
    with pytest.raises(EngineConfigError, match="max_num_tokens"):
        make_engine(max_num_tokens=0)


def test_async_engine_streams_and_cancellation_frees_kv():
    engine = make_engine()
    async_engine = AsyncEngine(engine)
    async_engine.start()

    async def main():
        streamed = []
        async for out in async_engine.generate([1, 2, 3], greedy(6, ignore_eos=True)):
            streamed.extend(out.new_token_ids)
        # A consumer that walks away mid-stream aborts its request.
        stream = async_engine.generate([4, 5, 6], greedy(100, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        return streamed

    try:
        streamed = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert len(streamed) == 6
    assert streamed == engine.generate([[1, 2, 3]], greedy(6, ignore_eos=True))[0].token_ids
    while engine.has_unfinished_requests():
        engine.step()
    engine.reset_prefix_cache()
    assert engine.allocator.num_free == engine.num_kv_pages


def test_generate_with_one_bad_prompt_queues_nothing():
    engine = make_engine()
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.generate([[1, 2, 3], [VOCAB + 1]], greedy(4))
    engine.step()
    assert not engine.has_unfinished_requests()
    assert engine.allocator.num_free == engine.num_kv_pages
    assert not engine._collect


def test_a_request_whose_constraints_allow_no_token_ends_alone():
    def ban_everything(output_ids, logits):
        return torch.full_like(logits, float("-inf"))

    engine = make_engine()
    dead = SamplingParams(max_tokens=4, temperature=0.0, logits_processors=[ban_everything])
    engine.add_request([1, 2, 3], dead, request_id="dead")
    engine.add_request([1, 2, 3], greedy(4, ignore_eos=True), request_id="fine")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.num_output_tokens)
    assert finished == {"dead": ("abort", 0), "fine": ("length", 4)}
    assert_pages_accounted(engine)


def test_a_failing_logits_processor_ends_only_its_request():
    """A processor that raises (a grammar rejecting the history, a bug) must not take the
    engine down: its request ends, the others go on."""

    def broken(output_ids, logits):
        if len(output_ids) == 2:
            raise RuntimeError("grammar rejected token")
        return logits

    engine = make_engine()
    engine.add_request([1, 2, 3], greedy(6, logits_processors=[broken]), request_id="broken")
    engine.add_request([1, 2, 3], greedy(6, ignore_eos=True), request_id="fine")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.num_output_tokens)
    assert finished == {"broken": ("abort", 2), "fine": ("length", 6)}
    assert_pages_accounted(engine)
