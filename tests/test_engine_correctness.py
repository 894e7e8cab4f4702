"""LLMEngine end to end vs transformers (fp32 greedy) on tiny random checkpoints.

Every engine output is compared token for token with transformers' batch-1 `generate` for the
same prompt, whatever the engine did on the way: batching prompts of different lengths,
chunking prefills into a 5-token budget, reusing prefix-cache pages, or retracting requests
when the KV pool runs dry.

Two greedy flavours are checked, each against its transformers counterpart:
- "ignore_eos": `ignore_eos=True`; EOS may be picked and generation goes on past it, like
  `generate(eos_token_id=None)`.
- "min_tokens": `min_tokens=64`; EOS is banned for all 64 tokens, like
  `generate(min_new_tokens=64)`.
(`ignore_eos=True` with `generate(min_new_tokens=64)` would differ wherever the model's greedy
pick is EOS: the engine emits it and carries on, transformers masks it.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.cpu_kernels.backends import CpuAttentionBackend
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.request import RequestOutput
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.engine.stats import EngineStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["qwen3_moe", "mixtral", "llama", "glm4_moe", "deepseek_v3", "gpt_oss", "llama4"]
WITH_MIXED = [*FAMILIES, "qwen3_moe_mixed", "deepseek_v3_plain", "llama4_maverick"]
MAX_TOKENS = 64
EOS = 0
IGNORE_EOS, MIN_TOKENS = "ignore_eos", "min_tokens"
MODES = (IGNORE_EOS, MIN_TOKENS)


def _random_ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=gen).tolist()


def _batch_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(20240611)
    return [_random_ids(gen, n) for n in (3, 40, 17, 8, 32, 12, 35, 5)]


def _prefix_prompts() -> list[list[int]]:
    """24 shared tokens (6 pages of 4) + suffixes of 3..6 tokens with distinct first tokens,
    so the shared prefix is exactly 24 tokens long."""
    gen = torch.Generator().manual_seed(7)
    shared = _random_ids(gen, 24)
    suffixes: list[list[int]] = []
    while len(suffixes) < 4:
        suffix = _random_ids(gen, 3 + len(suffixes))
        if suffix[0] not in {s[0] for s in suffixes} and suffix[0] != shared[0]:
            suffixes.append(suffix)
    return [shared + s for s in suffixes]


PROMPTS = _batch_prompts()
PREFIX_PROMPTS = _prefix_prompts()
SHARED_PREFIX = 24
# The batch alternates the two greedy flavours, so one step samples rows with and without bans.
BATCH_MODES = [MODES[i % 2] for i in range(len(PROMPTS))]


def params(mode: str, **overrides: Any) -> SamplingParams:
    if mode == IGNORE_EOS:
        base: dict[str, Any] = dict(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    else:
        base = dict(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    return SamplingParams(**{**base, **overrides})


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference(hf_model: Callable[[str], Any]) -> Callable[[str, Sequence[int], str], list[int]]:
    """transformers' batch-1 greedy continuation (64 tokens), computed once per key."""
    done: dict[tuple[str, tuple[int, ...], str], list[int]] = {}

    def get(variant: str, prompt: Sequence[int], mode: str = IGNORE_EOS) -> list[int]:
        key = (variant, tuple(prompt), mode)
        if key not in done:
            ids = torch.tensor([list(prompt)])
            eos_kwargs: dict[str, Any] = (
                {"eos_token_id": None} if mode == IGNORE_EOS else {"min_new_tokens": MAX_TOKENS}
            )
            with torch.no_grad():
                out = hf_model(variant).generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=MAX_TOKENS,
                    pad_token_id=2,
                    **eos_kwargs,
                )
            tokens = out[0, len(prompt) :].tolist()
            assert len(tokens) == MAX_TOKENS, (variant, mode, tokens)
            if mode == MIN_TOKENS:
                assert EOS not in tokens
            done[key] = tokens
        return done[key]

    return get


def make_engine(path: Path, **overrides: Any) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", **overrides))
    assert engine.model_config.dtype == torch.float32
    return engine


def run(
    engine: LLMEngine, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]
) -> tuple[list[list[int]], list[RequestOutput], list[EngineStats]]:
    """Submit every prompt, then step until all finish, collecting the streamed deltas.

    Returns per-request token ids and final outputs (in prompt order) and each step's stats."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, sampling, strict=True)]
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    finals: dict[str, RequestOutput] = {}
    stats: list[EngineStats] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finals, "output after the request finished"
            tokens[out.request_id] += out.new_token_ids
            assert out.num_output_tokens == len(tokens[out.request_id])
            if out.finished:
                finals[out.request_id] = out
        stats.append(engine.stats)
        assert len(stats) < 5000, "engine made no progress"
    assert set(finals) == set(rids)
    for rid in rids:
        assert finals[rid].finish_reason == "length", finals[rid]
    assert_no_leaked_pages(engine)
    return [tokens[rid] for rid in rids], [finals[rid] for rid in rids], stats


def assert_no_leaked_pages(engine: LLMEngine) -> None:
    """Idle engine: every used page belongs to the prefix cache, and none is pinned."""
    s = engine.stats
    assert s.num_running == 0 and s.num_waiting == 0
    assert s.kv_pages_used == s.kv_pages_cached == s.kv_pages_evictable, s
    assert s.kv_pages_used + s.kv_pages_free == s.kv_pages_total


def assert_outputs_match(
    variant: str,
    reference: Callable[[str, Sequence[int], str], list[int]],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[list[int]],
    modes: Sequence[str],
) -> None:
    for i, (prompt, ours, mode) in enumerate(zip(prompts, outputs, modes, strict=True)):
        theirs = reference(variant, prompt, mode)
        first_diff = next(
            (j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None
        )
        assert ours == theirs, (
            f"{variant} prompt {i} (len {len(prompt)}, {mode}): first difference at output "
            f"token {first_diff}"
        )


# (a) batch 1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", WITH_MIXED)
def test_batch1_greedy_matches_transformers(variant, checkpoint, reference):
    engine = make_engine(checkpoint(variant), enable_prefix_caching=False)
    prompt = PROMPTS[2]
    for mode in MODES:
        (result,) = engine.generate([prompt], params(mode))
        assert result.prompt_ids == prompt
        assert result.finish_reason == "length" and result.num_cached_tokens == 0
        assert len(result.token_ids) == MAX_TOKENS
        assert result.token_ids == reference(variant, prompt, mode), mode
        assert isinstance(result.text, str)  # detokenized (random bytes: content unchecked)
        if mode == MIN_TOKENS:
            assert EOS not in result.token_ids


# (b) one batch of prompts of different lengths --------------------------------------------


# Run twice: with the C++ CPU kernels (the default, as every other test here runs) and on the
# PyTorch paths they replace (SDPA over gathered K/V, padded expert matmuls).
@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu_kernels", "pytorch_paths"])
@pytest.mark.parametrize("variant", WITH_MIXED)
def test_mixed_length_batch_matches_batch1_reference(variant, cpu_kernels, checkpoint, reference):
    engine = make_engine(checkpoint(variant), max_batch_size=8, cpu_kernels=cpu_kernels)
    assert isinstance(engine.runner.attn, CpuAttentionBackend) == cpu_kernels
    outputs, finals, stats = run(engine, PROMPTS, [params(m) for m in BATCH_MODES])
    # All eight were prefilled together in the first step, then decoded together.
    assert stats[0].num_running == 8 and stats[0].decode_tokens == 0
    assert stats[0].prefill_tokens == sum(map(len, PROMPTS))
    assert stats[1].decode_tokens == 8 and stats[1].prefill_tokens == 0
    assert len(stats) == MAX_TOKENS
    assert all(f.num_cached_tokens == 0 for f in finals)
    assert_outputs_match(variant, reference, PROMPTS, outputs, BATCH_MODES)


# (c) chunked prefill ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", FAMILIES)
def test_chunked_prefill_matches_reference(variant, checkpoint, reference):
    engine = make_engine(checkpoint(variant), max_batch_size=8, max_num_tokens=5, page_size=4)
    outputs, _, stats = run(engine, PROMPTS, [params(m) for m in BATCH_MODES])
    assert max(s.prefill_tokens + s.decode_tokens for s in stats) <= 5
    mixed = [s for s in stats if s.prefill_tokens > 0 and s.decode_tokens > 0]
    assert mixed, "no step mixed prefill chunks with decodes"
    # The 40-token prompt alone needs 8 chunks of 5.
    assert sum(s.prefill_tokens > 0 for s in stats) >= sum(map(len, PROMPTS)) // 5
    assert_outputs_match(variant, reference, PROMPTS, outputs, BATCH_MODES)


# (d) prefix-cache hits --------------------------------------------------------------------


@pytest.mark.parametrize("variant", FAMILIES)
def test_prefix_cache_hits_reproduce_reference(variant, checkpoint, reference):
    engine = make_engine(checkpoint(variant), max_batch_size=8, page_size=4)
    first, *rest = PREFIX_PROMPTS

    (out0,), (final0,), _ = run(engine, [first], [params(IGNORE_EOS)])
    assert final0.num_cached_tokens == 0
    assert engine.stats.kv_pages_cached > 0

    outs, finals, stats = run(engine, rest, [params(IGNORE_EOS) for _ in rest])
    for final in finals:
        # Exactly the shared prefix (6 full pages): suffixes differ in their first token.
        assert final.num_cached_tokens == SHARED_PREFIX, final
    assert stats[0].cached_tokens == SHARED_PREFIX * len(rest)
    assert engine.stats.cached_tokens_total == SHARED_PREFIX * len(rest)
    assert_outputs_match(
        variant, reference, PREFIX_PROMPTS, [out0, *outs], [IGNORE_EOS] * len(PREFIX_PROMPTS)
    )

    # The same prompt again: every full page of it is cached, except that the last prompt
    # token is always recomputed (its logits give the first output token).
    again = PREFIX_PROMPTS[-1]
    (out,), (final,), _ = run(engine, [again], [params(IGNORE_EOS)])
    assert final.num_cached_tokens == (len(again) - 1) // 4 * 4 > SHARED_PREFIX
    assert out == outs[-1]

    # A follow-up turn: prompt + part of its answer. The answer's K/V was written by decode
    # steps and cached when the request finished, so the hit reaches past the prompt.
    follow_up = first + out0[:13]
    (out,), (final,), _ = run(engine, [follow_up], [params(IGNORE_EOS)])
    assert final.num_cached_tokens == (len(follow_up) - 1) // 4 * 4 > len(first)
    assert_outputs_match(variant, reference, [follow_up], [out], [IGNORE_EOS])


# (e) KV pool too small for the whole batch -> retraction ---------------------------------


@pytest.mark.parametrize("max_num_tokens", [2048, 5], ids=["one_step_prefill", "chunked"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "nocache"])
@pytest.mark.parametrize("variant", FAMILIES)
def test_tight_kv_pool_retracts_and_still_matches(
    variant, prefix_caching, max_num_tokens, checkpoint, reference
):
    longest = max(map(len, PROMPTS)) + MAX_TOKENS
    num_pages = -(-longest // 4)  # just room for the longest request, far from all eight
    engine = make_engine(
        checkpoint(variant),
        max_batch_size=8,
        page_size=4,
        num_kv_pages=num_pages,
        enable_prefix_caching=prefix_caching,
        max_num_tokens=max_num_tokens,
    )
    outputs, _, stats = run(engine, PROMPTS, [params(m) for m in BATCH_MODES])
    assert engine.stats.num_retractions_total > 0
    assert max(s.kv_pages_used for s in stats) <= num_pages
    if prefix_caching:  # retracted requests resumed from the pages they had computed
        assert engine.stats.cached_tokens_total > 0
    else:
        assert engine.stats.kv_pages_used == 0
    assert_outputs_match(variant, reference, PROMPTS, outputs, BATCH_MODES)


# (f) prefill logits through the engine ----------------------------------------------------


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"max_num_tokens": 5, "page_size": 4}],
    ids=["one_step_prefill", "chunked_prefill"],
)
@pytest.mark.parametrize("variant", WITH_MIXED)
def test_prefill_logprobs_match_transformers(variant, engine_kwargs, checkpoint, hf_model):
    engine = make_engine(checkpoint(variant), max_batch_size=8, **engine_kwargs)
    sp = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    results = engine.generate(PROMPTS, sp)
    model = hf_model(variant)
    for prompt, result in zip(PROMPTS, results, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        ref_lp = logits.float().log_softmax(dim=-1)
        ref_top = ref_lp.topk(5)
        assert len(result.token_ids) == 1 and len(result.top_logprobs) == 1
        top = result.top_logprobs[0]
        assert top is not None and len(top) == 5
        assert [t for t, _ in top] == ref_top.indices.tolist(), len(prompt)
        torch.testing.assert_close(
            torch.tensor([lp for _, lp in top]), ref_top.values, rtol=0, atol=1e-4
        )
        (token,) = result.token_ids
        assert token == int(ref_lp.argmax()) == top[0][0]
        assert result.logprobs[0] == pytest.approx(ref_lp[token].item(), abs=1e-4)


# (g) shared prefixes in flight at once ----------------------------------------------------


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_tokens": 5},
        {"max_num_tokens": 5, "schedule_policy": "lpm"},
    ],
    ids=["one_step_prefill", "chunked_fcfs", "chunked_lpm"],
)
@pytest.mark.parametrize("variant", FAMILIES)
def test_concurrent_shared_prefixes_match_reference(variant, engine_kwargs, checkpoint, reference):
    """Prompts sharing 24 tokens, all submitted at once. Prefilled in one step, each computes
    the prefix itself and the cache then dedups their pages; chunked, the later requests are
    admitted while the first still runs and reuse the pages it has published so far."""
    engine = make_engine(checkpoint(variant), max_batch_size=8, page_size=4, **engine_kwargs)
    modes = [IGNORE_EOS] * len(PREFIX_PROMPTS)
    outputs, finals, _ = run(engine, PREFIX_PROMPTS, [params(m) for m in modes])
    cached = [f.num_cached_tokens for f in finals]
    if "max_num_tokens" in engine_kwargs:
        assert cached[0] == 0
        assert all(c == SHARED_PREFIX for c in cached[1:]), cached
    else:
        assert cached == [0] * len(PREFIX_PROMPTS)
    assert_outputs_match(variant, reference, PREFIX_PROMPTS, outputs, modes)


# (h) aborts leave the rest of the batch intact --------------------------------------------


def test_abort_mid_batch_leaves_other_requests_intact(checkpoint, reference):
    variant = "qwen3_moe"
    engine = make_engine(checkpoint(variant), max_batch_size=8, max_num_tokens=5, page_size=4)
    rids = [engine.add_request(p, params(m)) for p, m in zip(PROMPTS, BATCH_MODES, strict=True)]
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    finish: dict[str, str | None] = {}
    steps = 0
    while engine.has_unfinished_requests():
        if steps == 12:
            # By now the first request decodes, later ones still prefill or wait.
            running = {r.request_id: r for r in engine.scheduler.running}
            waiting = {r.request_id for r in engine.scheduler.waiting}
            assert running[rids[0]].is_decoding and rids[-1] in waiting
            engine.abort(rids[0])
            engine.abort(rids[-1])
            engine.abort("no-such-request")  # ignored
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finish[out.request_id] = out.finish_reason
        steps += 1
        assert steps < 5000
    assert finish[rids[0]] == finish[rids[-1]] == "abort"
    assert 0 < len(tokens[rids[0]]) < MAX_TOKENS and tokens[rids[-1]] == []
    assert_no_leaked_pages(engine)
    kept = list(range(1, len(PROMPTS) - 1))
    assert all(finish[rids[i]] == "length" for i in kept)
    assert_outputs_match(
        variant,
        reference,
        [PROMPTS[i] for i in kept],
        [tokens[rids[i]] for i in kept],
        [BATCH_MODES[i] for i in kept],
    )
    # The aborted request's partial output is still the reference's prefix.
    partial = tokens[rids[0]]
    assert partial == reference(variant, PROMPTS[0], BATCH_MODES[0])[: len(partial)]
