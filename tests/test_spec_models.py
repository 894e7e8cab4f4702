"""Speculative decoding with draft models on the target's hidden states: MTP (the checkpoint's
NextN layer, on a tiny DeepSeek-V3) and EAGLE / EAGLE-3 heads (random ones on a tiny
Qwen3-MoE here; the trained head on the embedded model in test_spec_eagle_embedded.py).

Two properties together: greedy outputs are token-identical to transformers' (so verification
is exact whatever the drafts), and every draft the engine proposes is the one the draft model
gives when recomputed from scratch for that sequence (so incremental draft K/V, chaining,
pages shared with the target and the prefix cache keep the draft exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spec_heads import deepseek_with_mtp, reference_drafts, write_eagle_head
from test_engine_correctness import (
    IGNORE_EOS,
    MAX_TOKENS,
    assert_no_leaked_pages,
    assert_outputs_match,
    make_engine,
    params,
    reference,  # noqa: F401  (the session fixture: transformers' greedy continuations)
    run,
)
from test_spec_decode import MODES, PROMPTS

from bisllm_server.engine.config import EngineConfig, EngineConfigError
from bisllm_server.engine.engine import LLMEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHODS = ["mtp", "eagle", "eagle3"]


@pytest.fixture(scope="module")
def spec_setup(checkpoint, hf_model, tmp_path_factory):  # type: ignore[no-untyped-def]
    """method -> (variant the reference runs, checkpoint dir, engine options)."""
    root = tmp_path_factory.mktemp("spec_models")
    built: dict[str, tuple[str, Path, dict]] = {}

    def get(method: str) -> tuple[str, Path, dict]:
        if method not in built:
            if method == "mtp":
                src = checkpoint("deepseek_v3")
                path = deepseek_with_mtp(src, hf_model("deepseek_v3"), root / "deepseek_mtp")
                built[method] = ("deepseek_v3", path, {"speculative_method": "mtp"})
            else:
                target = checkpoint("qwen3_moe")
                head = write_eagle_head(target, root / method, eagle3=method == "eagle3")
                options = {"speculative_method": "eagle", "speculative_model": head}
                built[method] = ("qwen3_moe", target, options)
        return built[method]

    return get


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"num_draft_tokens": 3},
        {"num_draft_tokens": 1},
        {"num_draft_tokens": 5, "max_num_tokens": 5, "page_size": 4},
    ],
    ids=["draft3", "draft1", "draft5_chunked"],
)
@pytest.mark.parametrize("method", METHODS)
def test_greedy_matches_transformers_in_mixed_batches(
    method,
    engine_kwargs,
    spec_setup,
    reference,  # noqa: F811
):
    variant, path, options = spec_setup(method)
    engine = make_engine(path, max_batch_size=8, **options, **engine_kwargs)
    outputs, _, _ = run(engine, PROMPTS, [params(m) for m in MODES])
    assert_outputs_match(variant, reference, PROMPTS, outputs, MODES)
    s = engine.stats
    assert s.spec_verify_steps_total > 0 and s.spec_draft_tokens_total > 0
    assert_no_leaked_pages(engine)


def _record_drafts(engine: LLMEngine) -> list[tuple[list[int], list[int]]]:
    """(sequence so far, drafts) for every request each time drafts are verified."""
    seen: list[tuple[list[int], list[int]]] = []
    chain = engine.drafter.chain  # type: ignore[union-attr]

    def recording(reqs):  # type: ignore[no-untyped-def]
        chain(reqs)
        for req in reqs:
            if req.num_draft:
                real = req.seq_len - req.num_draft
                seen.append((req.token_ids[:real], req.token_ids[real:]))

    engine.drafter.chain = recording  # type: ignore[union-attr,method-assign]
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_drafts_equal_the_draft_model_recomputed_from_scratch(method, spec_setup):
    """Chunked prefill, small pages, prefix-cache hits (the second round repeats the prompts)
    and drafts rejected at every depth: the engine's drafts are still exactly the draft
    model's."""
    _, path, options = spec_setup(method)
    k = 4
    engine = make_engine(
        path, max_batch_size=4, max_num_tokens=12, page_size=4, num_draft_tokens=k, **options
    )
    seen = _record_drafts(engine)
    prompts = PROMPTS[:3]
    for _ in range(2):
        run(engine, prompts, [params(IGNORE_EOS, max_tokens=24)] * len(prompts))
    assert engine.stats.cached_tokens_total > 0
    assert len(seen) > 20
    target = engine.runner.model
    draft = engine.drafter.draft  # type: ignore[union-attr]
    layout = (
        engine.model_config.num_kv_heads,
        engine.model_config.head_dim,
        engine.model_config.kv_value_dim,
        engine.model_config.kv_shared,
    )
    for tokens, drafts in seen:
        want = reference_drafts(target, draft, layout, tokens, len(drafts))  # type: ignore[arg-type]
        assert drafts == want, (len(tokens), drafts, want)
    assert_no_leaked_pages(engine)


def test_mtp_with_a_tight_kv_pool_retracts_and_still_matches(
    spec_setup,
    reference,  # noqa: F811
):
    variant, path, options = spec_setup("mtp")
    longest = max(map(len, PROMPTS)) + MAX_TOKENS
    num_pages = -(-longest // 4) + 2
    engine = make_engine(
        path, max_batch_size=8, page_size=4, num_kv_pages=num_pages, num_draft_tokens=4, **options
    )
    outputs, _, stats = run(engine, PROMPTS, [params(m) for m in MODES])
    assert engine.stats.num_retractions_total > 0
    assert max(s.kv_pages_used for s in stats) <= num_pages
    assert_outputs_match(variant, reference, PROMPTS, outputs, MODES)
    assert_no_leaked_pages(engine)


def test_draft_model_errors_name_what_is_missing(checkpoint, tmp_path):
    with pytest.raises(EngineConfigError, match="speculative_model: speculative_method 'eagle'"):
        EngineConfig(model="m", speculative_method="eagle").validate()
    # transformers saves DeepSeek-V3 without its MTP layer: nothing to draft with.
    with pytest.raises(EngineConfigError, match="needs the checkpoint's NextN layers"):
        make_engine(checkpoint("deepseek_v3"), speculative_method="mtp")
    with pytest.raises(EngineConfigError, match=r"config\.json does not exist"):
        make_engine(checkpoint("qwen3_moe"), speculative_method="eagle", speculative_model=tmp_path)
    head = write_eagle_head(checkpoint("deepseek_v3"), tmp_path / "other", eagle3=True)
    good = json.loads((head / "config.json").read_text())
    for edit, message in (
        ({"hidden_size": 48}, "hidden_size 48 does not match"),
        (
            {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 7]}},
            r"layer 7 is not one of the target's layers 0\.\.2",
        ),
        ({"num_attention_heads": None}, r"config\.json has no 'num_attention_heads'"),
    ):
        (head / "config.json").write_text(json.dumps({**good, **edit}))
        with pytest.raises(EngineConfigError, match=message):
            make_engine(checkpoint("qwen3_moe"), speculative_method="eagle", speculative_model=head)
