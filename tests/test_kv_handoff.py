"""Disaggregation inside one process: a prompt's prefix prefilled on one engine
(`export_kv_from`) and decoded on another (`add_request(..., kv=...)`, into pages set aside by
`reserve_kv` or not) gives exactly the tokens of one engine doing both, including MLA's latent
cache, with the decode side's own prefix cache supplying what it already holds, and no page
left behind on either side."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine_correctness import (
    IGNORE_EOS,
    MIN_TOKENS,
    assert_no_leaked_pages,
    assert_outputs_match,
    make_engine,
    params,
    reference,  # noqa: F401  (the session fixture: transformers' greedy continuations)
)
from test_spec_decode import CODE, EMBEDDED, PROMPTS

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine, RequestError
from bisllm_server.engine.kv_handoff import HandoffFormatError, KVHandoff
from bisllm_server.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFILL_ONLY = SamplingParams(max_tokens=1, temperature=0)


def prefill(engine: LLMEngine, prompts, skip_pages=None) -> list[KVHandoff]:  # type: ignore[no-untyped-def]
    """What a prefill worker does: each prompt less its last token, K/V exported from page
    `skip_pages[i]` (what the decode side already holds) when the request finishes."""
    skips = skip_pages or [0] * len(prompts)
    rids = [
        engine.add_request(list(p)[:-1], PREFILL_ONLY, export_kv_from=k, detokenize=False)
        for p, k in zip(prompts, skips, strict=True)
    ]
    handoffs: dict[str, KVHandoff] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.kv is not None
                handoffs[out.request_id] = out.kv
    return [handoffs[rid] for rid in rids]


def decode(engines: list[LLMEngine], prompts, sampling, handoffs) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Round-robin the handed-off requests over the decode engines; step them all to the end."""
    placed = []
    for i, (p, sp, kv) in enumerate(zip(prompts, sampling, handoffs, strict=True)):
        engine = engines[i % len(engines)]
        placed.append((engine, engine.add_request(p, sp, kv=kv, request_id=f"d{i}")))
    return run_to_end(engines, [rid for _, rid in placed])


def run_to_end(engines: list[LLMEngine], rids: list[str]) -> list[list[int]]:
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    while any(e.has_unfinished_requests() for e in engines):
        for engine in engines:
            for out in engine.step():
                if out.request_id in tokens:
                    tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[rid] for rid in rids]


@pytest.mark.parametrize("decoders", [1, 2], ids=["1P1D", "1P2D"])
@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_prefill_here_decode_there_matches_transformers(
    variant,
    decoders,
    checkpoint,
    reference,  # noqa: F811
):
    path = checkpoint(variant)
    modes = [IGNORE_EOS, MIN_TOKENS] * (len(PROMPTS) // 2)
    sampling = [params(m) for m in modes]
    prefiller = make_engine(path, max_batch_size=8, page_size=4)
    handoffs = prefill(prefiller, PROMPTS)
    assert_no_leaked_pages(prefiller)
    engines = [make_engine(path, max_batch_size=8, page_size=4) for _ in range(decoders)]
    outputs = decode(engines, PROMPTS, sampling, handoffs)
    assert_outputs_match(variant, reference, PROMPTS, outputs, modes)
    for engine in engines:
        assert engine.stats.prompt_tokens_total > 0
        assert_no_leaked_pages(engine)


def test_embedded_model_handoff_matches_aggregated_serving_and_reuses_the_decode_cache():
    def engine() -> LLMEngine:
        return LLMEngine(EngineConfig(model=EMBEDDED, dtype="float32", page_size=4))

    sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = [CODE[0], CODE[0] + "    return width * height\n", CODE[2]]
    expected = engine().generate(prompts, sp)
    prefiller, decoder = engine(), engine()
    ids = [decoder.tokenizer.encode(p) for p in prompts]
    results = []
    for i, p in enumerate(ids):  # one by one: the second hits the decode side's cache
        # The handshake: pages set aside first; the prefill side skips what is cached here.
        cached_pages = decoder.reserve_kv(f"r{i}", p)
        assert cached_pages is not None and (cached_pages > 0) == (i == 1)
        (kv,) = prefill(prefiller, [p], [cached_pages])
        assert kv.start_page == cached_pages
        rid = decoder.add_request(p, sp, kv=kv, request_id=f"r{i}")
        text, tokens = "", []
        while decoder.has_unfinished_requests():
            for out in decoder.step():
                if out.request_id == rid:
                    tokens += out.new_token_ids
                    text += out.new_text
        results.append((tokens, text))
    assert [r[0] for r in results] == [o.token_ids for o in expected]
    assert [r[1] for r in results] == [o.text for o in expected]
    assert decoder.stats.cached_tokens_total > 0  # the shared prefix was not imported again
    assert_no_leaked_pages(prefiller)
    assert_no_leaked_pages(decoder)


def test_bad_handoffs_are_refused_naming_the_problem(checkpoint):
    path = checkpoint("qwen3_moe")
    prefiller = make_engine(path, page_size=4)
    (kv,) = prefill(prefiller, [PROMPTS[0]])
    sp = params(IGNORE_EOS)
    with pytest.raises(RequestError, match="different prompt"):
        make_engine(path, page_size=4).add_request(PROMPTS[1], sp, kv=kv)
    with pytest.raises(RequestError, match="must be a proper prefix"):
        make_engine(path, page_size=4).add_request(PROMPTS[0][:-1], sp, kv=kv)
    with pytest.raises(RequestError, match="page_size 4 differs from this engine's 16"):
        make_engine(path).add_request(PROMPTS[0], sp, kv=kv)
    with pytest.raises(RequestError, match="does not match this model's cache"):
        make_engine(checkpoint("deepseek_v3"), page_size=4).add_request(PROMPTS[0], sp, kv=kv)
    # An aborted export request exports nothing.
    rid = prefiller.add_request(PROMPTS[0], sp, export_kv_from=0)
    prefiller.abort(rid)
    outs = []
    while prefiller.has_unfinished_requests():
        outs += prefiller.step()
    assert [o.finish_reason for o in outs if o.finished] == ["abort"] and outs[-1].kv is None
    assert_no_leaked_pages(prefiller)


def test_reservations_fall_back_to_local_prefill_and_give_their_pages_back(checkpoint):
    path = checkpoint("qwen3_moe")
    sp = params(IGNORE_EOS)
    (expected,) = run_to_end([e := make_engine(path, page_size=4)], [e.add_request(PROMPTS[2], sp)])
    engine = make_engine(path, page_size=4)
    free = engine.stats.kv_pages_free
    assert engine.reserve_kv("gone", PROMPTS[2]) == 0
    assert engine.stats.kv_pages_free == free - -(-len(PROMPTS[2]) // 4)
    with pytest.raises(RequestError, match="already in use"):
        engine.reserve_kv("gone", PROMPTS[2])
    engine.abort("gone")  # the client left before its K/V came
    engine.step()
    assert_no_leaked_pages(engine)
    # No K/V came (every prefill worker failed): the request prefills into its reservation.
    engine.reserve_kv("local", PROMPTS[2])
    assert run_to_end([engine], [engine.add_request(PROMPTS[2], sp, request_id="local")]) == [
        expected
    ]
    # A handoff that skips pages this side does not hold is not used: computed here instead.
    (late,) = prefill(make_engine(path, page_size=4), [PROMPTS[3]], [2])
    other = make_engine(path, page_size=4)
    (tokens,) = run_to_end([other], [other.add_request(PROMPTS[3], sp, kv=late)])
    (direct,) = run_to_end([e := make_engine(path, page_size=4)], [e.add_request(PROMPTS[3], sp)])
    assert tokens == direct
    for e in (engine, other):
        assert_no_leaked_pages(e)
    # Pool exhausted: no reservation, nothing taken.
    tiny = make_engine(path, page_size=4, kv_cache_bytes=4 * 6144)  # four pages
    big = list(range(3, 3 + 4 * tiny.num_kv_pages + 8))
    assert tiny.reserve_kv("big", big) is None
    assert_no_leaked_pages(tiny)


def test_seeded_sampling_is_unchanged_because_the_first_token_is_sampled_on_the_decode_side(
    checkpoint,
):
    path = checkpoint("qwen3_moe")
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    (expected,) = run_to_end([e := make_engine(path, page_size=4)], [e.add_request(PROMPTS[1], sp)])
    (kv,) = prefill(make_engine(path, page_size=4), [PROMPTS[1]])
    assert decode([make_engine(path, page_size=4)], [PROMPTS[1]], [sp], [kv]) == [expected]


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_the_wire_format_round_trips_and_refuses_damage(variant, checkpoint):
    path = checkpoint(variant)
    (kv,) = prefill(make_engine(path, page_size=4), [PROMPTS[1]])
    for data in (kv.data, kv.data.bfloat16()):
        original = dataclasses.replace(kv, data=data)
        back = KVHandoff.from_bytes(original.to_bytes())
        assert back.prompt_ids == kv.prompt_ids and back.start_page == kv.start_page
        assert back.data.dtype == data.dtype and torch.equal(back.data, data)
    payload = bytearray(kv.to_bytes())
    flipped = bytearray(payload)
    flipped[-5] ^= 0x40
    with pytest.raises(HandoffFormatError, match="checksum mismatch"):
        KVHandoff.from_bytes(bytes(flipped))
    with pytest.raises(HandoffFormatError, match="bytes of K/V, the header announces"):
        KVHandoff.from_bytes(bytes(payload[:-7]))
    with pytest.raises(HandoffFormatError, match="bad magic"):
        KVHandoff.from_bytes(b"GIF89a" + bytes(payload[6:]))
    # Decoded from the wire, it still decodes to transformers' tokens.
    engine = make_engine(path, page_size=4)
    (tokens,) = decode(
        [engine], [PROMPTS[1]], [params(IGNORE_EOS)], [KVHandoff.from_bytes(bytes(payload))]
    )
    (direct,) = decode([make_engine(path, page_size=4)], [PROMPTS[1]], [params(IGNORE_EOS)], [kv])
    assert tokens == direct
    assert_no_leaked_pages(engine)
