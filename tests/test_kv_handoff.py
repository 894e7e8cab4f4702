"""Disaggregation inside one process: a prompt prefilled on one engine (`hold_kv`, then
`export_kv`) and decoded on another (`add_request(..., kv=...)`) gives exactly the tokens of
one engine doing both, including MLA's latent cache, with the decode side's own prefix cache
supplying what it already holds, and no page left behind on either side."""

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


def prefill(engine: LLMEngine, prompts, sampling) -> list[KVHandoff]:  # type: ignore[no-untyped-def]
    """Prefill every prompt (first token only) and export its K/V; then release it."""
    first = [
        dataclasses.replace(sp, max_tokens=1, min_tokens=min(sp.min_tokens, 1)) for sp in sampling
    ]
    rids = [engine.add_request(p, sp, hold_kv=True) for p, sp in zip(prompts, first, strict=True)]
    while engine.has_unfinished_requests():
        engine.step()
    handoffs = [engine.export_kv(rid) for rid in rids]
    for rid in rids:
        engine.release_kv(rid)
    return handoffs


def decode(engines: list[LLMEngine], prompts, sampling, handoffs) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Round-robin the handed-off requests over the decode engines; step them all to the end."""
    placed = []
    for i, (p, sp, kv) in enumerate(zip(prompts, sampling, handoffs, strict=True)):
        engine = engines[i % len(engines)]
        placed.append((engine, engine.add_request(p, sp, kv=kv, request_id=f"d{i}")))
    tokens: dict[str, list[int]] = {rid: [] for _, rid in placed}
    while any(e.has_unfinished_requests() for e in engines):
        for engine in engines:
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[rid] for _, rid in placed]


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
    handoffs = prefill(prefiller, PROMPTS, sampling)
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
    handoffs = prefill(prefiller, prompts, [sp] * 3)
    ids = [decoder.tokenizer.encode(p) for p in prompts]
    results = []
    for p, kv in zip(ids, handoffs, strict=True):  # one by one: the second hits the cache
        rid = decoder.add_request(p, sp, kv=kv)
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
    (kv,) = prefill(prefiller, [PROMPTS[0]], [params(IGNORE_EOS)])
    sp = params(IGNORE_EOS)
    with pytest.raises(RequestError, match="different prompt"):
        make_engine(path, page_size=4).add_request(PROMPTS[1], sp, kv=kv)
    with pytest.raises(RequestError, match="page_size 4 differs from this engine's 16"):
        make_engine(path).add_request(PROMPTS[0], sp, kv=kv)
    with pytest.raises(RequestError, match="does not match this model's cache"):
        make_engine(checkpoint("deepseek_v3"), page_size=4).add_request(PROMPTS[0], sp, kv=kv)
    with pytest.raises(RequestError, match="max_tokens >= 2"):
        make_engine(path, page_size=4).add_request(
            PROMPTS[0], params(IGNORE_EOS, max_tokens=1), kv=kv
        )
    with pytest.raises(RequestError, match="holds no KV"):
        prefiller.export_kv("nope")
    # An aborted hold_kv request holds nothing.
    rid = prefiller.add_request(PROMPTS[0], sp, hold_kv=True)
    prefiller.abort(rid)
    while prefiller.has_unfinished_requests():
        prefiller.step()
    with pytest.raises(RequestError, match="holds no KV"):
        prefiller.export_kv(rid)
    assert_no_leaked_pages(prefiller)


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_the_wire_format_round_trips_and_refuses_damage(variant, checkpoint):
    path = checkpoint(variant)
    (kv,) = prefill(make_engine(path, page_size=4), [PROMPTS[1]], [params(IGNORE_EOS)])
    for data in (kv.data, kv.data.bfloat16()):
        original = dataclasses.replace(kv, data=data)
        back = KVHandoff.from_bytes(original.to_bytes())
        assert back.prompt_ids == kv.prompt_ids and back.first_token == kv.first_token
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
