"""Speculative decoding with NGram drafts: the proposer, and the engine's greedy verification.

Greedy outputs with speculation must be token-identical to transformers' batch-1 greedy
`generate` (the same reference as test_engine_correctness.py), in mixed batches where some
requests speculate and others (EOS banned by min_tokens, so not plain greedy) decode one token
at a time; with chunked prefill cutting drafts short, and with a KV pool tight enough to retract
requests that hold drafts. No page may leak, whatever was rejected or aborted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine_correctness import (
    IGNORE_EOS,
    MAX_TOKENS,
    MIN_TOKENS,
    assert_no_leaked_pages,
    assert_outputs_match,
    make_engine,
    params,
    reference,  # noqa: F401  (the session fixture: transformers' greedy continuations)
    run,
)

from bisllm_server.engine.config import EngineConfig, EngineConfigError
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.engine.speculative.ngram import NGramProposer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"


def _repetitive_prompts() -> list[list[int]]:
    """Phrases repeated a few times with a varying tail: what NGram lookup is made for (random
    models also fall into loops of their own, which drafts then follow)."""
    gen = torch.Generator().manual_seed(99)
    prompts = []
    for phrase_len, repeats, tail in ((6, 3, 2), (4, 5, 0), (9, 2, 5), (3, 4, 1)):
        phrase = torch.randint(3, 300, (phrase_len,), generator=gen).tolist()
        prompts.append(phrase * repeats + torch.randint(3, 300, (tail,), generator=gen).tolist())
    for n in (7, 19, 30, 11):  # and plain random ones
        prompts.append(torch.randint(3, 300, (n,), generator=gen).tolist())
    return prompts


PROMPTS = _repetitive_prompts()
# Half the batch speculates (plain greedy); the other half has EOS banned (min_tokens) and
# decodes a token per step beside it.
MODES = [
    IGNORE_EOS,
    MIN_TOKENS,
    IGNORE_EOS,
    IGNORE_EOS,
    MIN_TOKENS,
    IGNORE_EOS,
    MIN_TOKENS,
    IGNORE_EOS,
]


# -- the proposer -----------------------------------------------------------------------------


def test_ngram_takes_the_longest_suffix_and_its_latest_occurrence() -> None:
    p = NGramProposer(num_draft_tokens=3, min_n=1, max_n=3)
    # "7 8" occurred twice; the latest occurrence is followed by 4 5 6.
    assert p.propose([7, 8, 1, 2, 7, 8, 4, 5, 6, 9, 7, 8]) == [4, 5, 6]
    # A 3-token suffix match beats a more recent 1-token one.
    assert p.propose([1, 2, 3, 10, 11, 12, 3, 20, 1, 2, 3]) == [10, 11, 12]
    assert p.propose([1, 2, 3, 4]) == []  # no earlier occurrence of any suffix
    assert p.propose([5, 6, 5, 6, 5], limit=1) == [6]
    assert p.propose([5, 6, 5], limit=0) == []
    # Drafts stop at the end of the sequence.
    assert p.propose([4, 9, 4]) == [9, 4]


def _reference_propose(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition, spelled out: for n from max_n down to min_n, the latest earlier
    occurrence of the n-token suffix (ending before the last token), and what followed it."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        for start in range(length - 1 - n, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_ngram_agrees_with_the_definition_on_random_sequences() -> None:
    gen = torch.Generator().manual_seed(3)
    for trial in range(500):
        length = int(torch.randint(1, 40, (1,), generator=gen))
        vocab = int(torch.randint(2, 6, (1,), generator=gen))
        tokens = torch.randint(0, vocab, (length,), generator=gen).tolist()
        min_n = 1 + trial % 2
        max_n = min_n + trial % 4
        k = 1 + trial % 5
        want = _reference_propose(tokens, k, min_n, max_n)
        assert NGramProposer(k, min_n, max_n).propose(tokens) == want, (tokens, min_n, max_n)


def test_ngram_min_n_filters_short_matches() -> None:
    assert NGramProposer(4, min_n=2, max_n=3).propose([1, 5, 9, 1]) == []
    assert NGramProposer(4, min_n=1, max_n=3).propose([1, 5, 9, 1]) == [5, 9, 1]


def test_bad_speculative_settings_name_the_field() -> None:
    with pytest.raises(EngineConfigError, match="speculative_method must be one of ngram"):
        EngineConfig(model="m", speculative_method="medusa").validate()  # type: ignore[arg-type]
    with pytest.raises(EngineConfigError, match="num_draft_tokens must be a positive integer"):
        EngineConfig(model="m", speculative_method="ngram", num_draft_tokens=0).validate()
    with pytest.raises(EngineConfigError, match=r"ngram_min \(3\) must be <= ngram_max \(2\)"):
        EngineConfig(model="m", speculative_method="ngram", ngram_min=3, ngram_max=2).validate()


# -- greedy identity --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"num_draft_tokens": 4},
        {"num_draft_tokens": 1},
        {"num_draft_tokens": 6, "max_num_tokens": 5, "page_size": 4},
    ],
    ids=["draft4", "draft1", "draft6_chunked"],
)
@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_ngram_greedy_matches_transformers_in_mixed_batches(
    variant,
    engine_kwargs,
    checkpoint,
    reference,  # noqa: F811  (the fixture imported above)
):
    engine = make_engine(
        checkpoint(variant), max_batch_size=8, speculative_method="ngram", **engine_kwargs
    )
    outputs, _, _ = run(engine, PROMPTS, [params(m) for m in MODES])
    assert_outputs_match(variant, reference, PROMPTS, outputs, MODES)
    s = engine.stats
    assert s.spec_verify_steps_total > 0 and s.spec_accepted_tokens_total > 0
    assert s.spec_accepted_tokens_total < s.spec_draft_tokens_total, "no draft was rejected"
    assert 0 < s.speculation_rate < 1


def test_ngram_with_a_tight_kv_pool_retracts_and_still_matches(
    checkpoint,
    reference,  # noqa: F811  (the fixture imported above)
):
    variant = "qwen3_moe"
    longest = max(map(len, PROMPTS)) + MAX_TOKENS
    num_pages = -(-longest // 4) + 2  # room for the longest request (and a draft), not all
    engine = make_engine(
        checkpoint(variant),
        max_batch_size=8,
        page_size=4,
        num_kv_pages=num_pages,
        speculative_method="ngram",
        num_draft_tokens=5,
    )
    outputs, _, stats = run(engine, PROMPTS, [params(m) for m in MODES])
    assert engine.stats.num_retractions_total > 0
    assert max(s.kv_pages_used for s in stats) <= num_pages
    assert engine.stats.spec_accepted_tokens_total > 0
    assert_outputs_match(variant, reference, PROMPTS, outputs, MODES)


def test_speculation_takes_fewer_steps_on_repetitive_input(checkpoint):
    path = checkpoint("qwen3_moe")
    steps = {}
    for method in (None, "ngram"):
        engine = make_engine(path, speculative_method=method, num_draft_tokens=4)
        _, finals, stats = run(engine, PROMPTS[:1], [params(IGNORE_EOS)])
        steps[method] = len(stats)
        assert finals[0].num_output_tokens == MAX_TOKENS
    assert steps["ngram"] < steps[None]


# -- stop conditions, aborts and accounting -----------------------------------------------------


def _embedded(**overrides) -> LLMEngine:  # type: ignore[no-untyped-def]
    return LLMEngine(EngineConfig(model=EMBEDDED, dtype="float32", **overrides))


CODE = [
    "def area(width, height):\n    return width * height\n\n\ndef area(width, height):\n",
    "The river stone cloud. The river stone cloud. The river stone",
    "Once upon a time",
]


def test_embedded_model_ngram_matches_plain_decoding_with_stops() -> None:
    """On the embedded model, stop conditions that land in the middle of an accepted run end
    the request exactly where plain decoding does: a stop token, an exact max_tokens, and a
    stop string (with its text and finish reason)."""
    plain = _embedded()
    spec = _embedded(speculative_method="ngram", num_draft_tokens=5)
    base = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    expected = plain.generate(CODE, base)
    ours = spec.generate(CODE, base)
    assert [o.token_ids for o in ours] == [o.token_ids for o in expected]
    assert sum(o.num_accepted_tokens for o in ours) > 0
    assert all(o.num_accepted_tokens <= o.num_draft_tokens for o in ours)

    first = expected[0].token_ids
    stop_token = first[20]
    cut = first.index(stop_token)
    variants = [
        SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=48, temperature=0, stop=[expected[0].text[30:34]]),
    ]
    for sp in variants:
        want = plain.generate(CODE[:1], sp)[0]
        got = spec.generate(CODE[:1], sp)[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            want.token_ids,
            want.text,
            want.finish_reason,
            want.stop_reason,
        ), sp
    assert plain.generate(CODE[:1], variants[0])[0].token_ids == first[: cut + 1]
    assert_no_leaked_pages(spec)


def run_with_aborts(engine: LLMEngine, prompts: list[str], abort_at_step: int) -> None:
    """12 speculating requests over `prompts` (pages of 4 tokens), every third aborted at
    `abort_at_step`; pages reserved for rejected drafts must go back at once, and none may
    be left when all are done."""
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    rids = [engine.add_request(prompts[i % len(prompts)], sp) for i in range(12)]
    aborted = set(rids[::3])
    steps = 0
    while engine.has_unfinished_requests():
        if steps == abort_at_step:
            for rid in aborted:
                engine.abort(rid)
        for out in engine.step():
            if out.finished:
                want = "abort" if out.request_id in aborted else "length"
                assert out.finish_reason == want, out
        for req in engine.scheduler.running:
            # Pages reserved for rejected drafts go back at once, not when the request ends.
            assert len(req.pages) <= -(-req.seq_len // 4), (req.request_id, len(req.pages))
            assert req.num_draft == 0
        steps += 1
        assert steps < 2000
    s = engine.stats
    assert s.spec_draft_tokens_total > s.spec_accepted_tokens_total > 0
    assert engine.scheduler.pages_held_by_requests() == 0
    assert_no_leaked_pages(engine)


def test_many_speculative_requests_with_aborts_leak_no_pages() -> None:
    engine = _embedded(
        speculative_method="ngram", num_draft_tokens=6, page_size=4, max_num_tokens=24
    )
    run_with_aborts(engine, CODE, abort_at_step=6)


# -- through the server --------------------------------------------------------------------------


def test_speculative_config_ngram_serves_identical_text_and_reports_speculation_rate() -> None:
    """speculative_config {decoding_type: NGram} reaches the engine through `bisllm serve`'s
    build path; the completion equals the one served without it, and /metrics shows the
    accepted share of the drafts as `speculation_rate`."""
    import httpx
    from server_fixtures import REPO as SERVER_REPO
    from server_fixtures import serve_app, tiny_spec

    from bisllm_server.openai.launch import ServeOptions, build_server, resolve_model_dir
    from bisllm_truss.spec import SpeculationSpec

    plain_spec = tiny_spec()
    ngram = SpeculationSpec(
        decoding_type="NGram",
        max_draft_len=5,
        speculative_model_dir=None,
        num_nextn_predict_layers=None,
        eagle3_one_model=False,
    )
    body = {"prompt": CODE[0], "max_tokens": 40, "temperature": 0}
    texts = {}
    for name, spec in (
        ("plain", plain_spec),
        ("ngram", plain_spec.model_copy(update={"speculation": ngram})),
    ):
        model_dir = resolve_model_dir(spec, [SERVER_REPO])
        app, engine = build_server(spec, model_dir, ServeOptions(device="cpu"))
        try:
            assert engine.engine.config.speculative_method == (None if name == "plain" else "ngram")
            with serve_app(app) as url:
                response = httpx.post(url + "/v1/completions", json=body, timeout=120)
                assert response.status_code == 200, response.text
                texts[name] = response.json()["choices"][0]["text"]
                metrics = httpx.get(url + "/metrics", timeout=30).text
        finally:
            engine.shutdown()
        rate = next(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("speculation_rate{")
        )
        if name == "plain":
            assert rate == 0
        else:
            assert 0 < rate <= 1
    assert texts["ngram"] == texts["plain"]


# -- sampling: the output distribution is the target's -------------------------------------------


class MarkovModel:
    """Logits that depend on the current token only (a Markov chain over a small vocabulary),
    so the exact probability of any continuation is a product of table entries."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, vocab_size, generator=gen) * 1.5

    def __call__(self, batch, attn) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self.table[batch.input_ids[batch.logits_indices]].to(torch.float32)


def _target(table: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    probs = (table / temperature).softmax(dim=-1)
    if top_k:
        cut = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= cut, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True)


def _chi_square_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (z = 3.09), by Wilson-Hilferty."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * a**0.5) ** 3


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 4)])
def test_speculative_sampling_keeps_the_target_distribution(temperature: float, top_k: int) -> None:
    from engine_fakes import checksum_config

    vocab, requests, length = 6, 3000, 3
    model = MarkovModel(vocab, seed=5)
    engine = LLMEngine(
        EngineConfig(
            model="markov",
            page_size=4,
            num_kv_pages=4096,
            max_batch_size=64,
            max_num_tokens=512,
            max_seq_len=64,
            speculative_method="ngram",
            num_draft_tokens=2,
        ),
        model=model,
        model_config=checksum_config(vocab_size=vocab, max_len=64),
        tokenizer=None,
    )
    # Every token and its likely successors occur in the prompt, so NGram finds drafts after
    # whatever the chain samples.
    prompt = [0, 1, 2, 3, 4, 5, 0, 4, 0, 4, 2, 4, 5, 3, 2]
    sampling = [
        SamplingParams(
            max_tokens=length, temperature=temperature, top_k=top_k, ignore_eos=True, seed=i
        )
        for i in range(requests)
    ]
    outputs = engine.generate([prompt] * requests, sampling, detokenize=False)
    s = engine.stats
    assert s.spec_draft_tokens_total > s.spec_accepted_tokens_total > 0, "both paths exercised"

    # Exact probability of every 3-token continuation, then a chi-square goodness-of-fit test
    # (cells expected below 5 pooled into one).
    p = _target(model.table, temperature, top_k)
    counts: dict[tuple[int, ...], int] = {}
    for out in outputs:
        key = tuple(out.token_ids)
        counts[key] = counts.get(key, 0) + 1
    stat = pooled_observed = pooled_expected = 0.0
    cells = 0
    for a in range(vocab):
        for b in range(vocab):
            for c in range(vocab):
                prob = float(p[prompt[-1], a] * p[a, b] * p[b, c])
                observed = counts.get((a, b, c), 0)
                if prob == 0:
                    assert observed == 0, f"{(a, b, c)} is outside top-k but was sampled"
                    continue
                expected = prob * requests
                if expected < 5:
                    pooled_observed += observed
                    pooled_expected += expected
                    continue
                stat += (observed - expected) ** 2 / expected
                cells += 1
    if pooled_expected > 0:
        stat += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        cells += 1
    assert stat < _chi_square_critical(cells - 1), (stat, cells)
