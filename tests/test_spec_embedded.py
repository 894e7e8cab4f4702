"""Draft models trained for the embedded default model: the EAGLE-3 head
(examples/bisllm-tiny-moe/eagle3, fitted by recipe/eagle.py) and the MTP layer
(examples/bisllm-tiny-moe/mtp, fitted by recipe/mtp.py, added to a copy of the checkpoint as
model.layers.4.*). Real drafts, often accepted, so acceptance, chained drafting over accepted
runs and stops inside accepted runs are exercised, not only rejection.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from spec_heads import reference_drafts
from test_engine_correctness import assert_no_leaked_pages
from test_spec_decode import CODE, EMBEDDED, run_with_aborts

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD = EMBEDDED.parent / "eagle3"
sys.path.insert(0, str(EMBEDDED.parent))
from recipe.mtp import assemble_checkpoint  # noqa: E402

METHODS = ["eagle", "mtp"]
CHAT = [
    "<|im_start|>user\nWhat does json.dumps do?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain os.path.join.<|im_end|>\n<|im_start|>assistant\n",
]
PROMPTS = [
    *CODE,
    "def is_palindrome(text):\n",
    "import os\n\n\ndef list_python_files(directory):\n",
    *CHAT,
]


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assemble_checkpoint(tmp_path_factory.mktemp("tiny_moe_mtp"))


def _engine(model: Path = EMBEDDED, **overrides) -> LLMEngine:  # type: ignore[no-untyped-def]
    return LLMEngine(EngineConfig(model=model, dtype="float32", **overrides))


def _eagle(**overrides) -> LLMEngine:  # type: ignore[no-untyped-def]
    return _engine(speculative_method="eagle", speculative_model=HEAD, **overrides)


@pytest.fixture
def speculative(request):  # type: ignore[no-untyped-def]
    """An engine factory for the parametrized method, on the embedded model."""

    def make(**overrides) -> LLMEngine:  # type: ignore[no-untyped-def]
        if request.param == "mtp":
            path = request.getfixturevalue("mtp_checkpoint")
            return _engine(path, speculative_method="mtp", **overrides)
        return _eagle(**overrides)

    return make


def test_the_mtp_checkpoint_loads_the_trained_layer_and_decodes_like_the_original(
    mtp_checkpoint,
) -> None:
    engine = _engine(mtp_checkpoint, speculative_method="mtp")
    model = engine.runner.model
    assert model.mtp is not None and len(model.mtp) == 1  # type: ignore[union-attr]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = _engine(mtp_checkpoint).generate(CODE[:1], sp)
    assert plain[0].token_ids == _engine().generate(CODE[:1], sp)[0].token_ids


def test_eagle3_head_loads_in_its_released_layout() -> None:
    engine = _eagle()
    draft = engine.drafter.draft  # type: ignore[union-attr]
    assert draft.eagle3 and draft.aux_layers == (0, 1, 2)
    assert draft.lm_head.out_features < engine.model_config.vocab_size  # a reduced draft vocab
    assert engine.draft_kv_pool is not None
    assert engine.draft_kv_pool.num_pages == engine.kv_pool.num_pages


@pytest.mark.parametrize("speculative", METHODS, indirect=True)
def test_greedy_matches_plain_decoding_and_drafts_pay_off(speculative) -> None:
    sp = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    plain = _engine(max_batch_size=8).generate(PROMPTS, sp)
    engine = speculative(max_batch_size=8, num_draft_tokens=3)
    ours = engine.generate(PROMPTS, sp)
    assert [o.token_ids for o in ours] == [o.token_ids for o in plain]
    s = engine.stats
    # A trained draft: well over one token per target forward (plain decoding makes one).
    assert s.accept_length > 1.5, s
    assert 0.15 < s.speculation_rate < 1
    assert_no_leaked_pages(engine)


@pytest.mark.parametrize("speculative", METHODS, indirect=True)
def test_stops_inside_accepted_runs_end_where_plain_decoding_does(speculative) -> None:
    plain, spec = _engine(), speculative(num_draft_tokens=4)
    first = plain.generate(CODE[:1], SamplingParams(max_tokens=48, temperature=0))[0]
    variants = [
        SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[first.token_ids[20]]),
        SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=48, temperature=0, stop=[first.text[30:34]]),
        SamplingParams(max_tokens=200, temperature=0),  # ends at <|im_end|> / EOS
    ]
    for sp in variants:
        for prompt in (CODE[0], CHAT[0]):
            want = plain.generate([prompt], sp)[0]
            got = spec.generate([prompt], sp)[0]
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
                want.token_ids,
                want.text,
                want.finish_reason,
                want.stop_reason,
            ), sp
    assert spec.stats.spec_accepted_tokens_total > 0
    assert_no_leaked_pages(spec)


@pytest.mark.parametrize("speculative", METHODS, indirect=True)
def test_drafts_over_accepted_runs_equal_the_draft_recomputed_from_scratch(speculative) -> None:
    from test_spec_models import _record_drafts

    k = 4
    engine = speculative(max_batch_size=4, max_num_tokens=32, page_size=4, num_draft_tokens=k)
    seen = _record_drafts(engine)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for _ in range(2):  # the second round hits the prefix cache
        engine.generate(PROMPTS[:4], sp)
    assert engine.stats.cached_tokens_total > 0
    s = engine.stats
    assert s.spec_accepted_tokens_total > 0.4 * s.spec_verify_steps_total, s
    mc = engine.model_config
    layout = (mc.num_kv_heads, mc.head_dim, mc.kv_value_dim, mc.kv_shared)
    target, draft = engine.runner.model, engine.drafter.draft  # type: ignore[union-attr]
    for tokens, drafts in seen[::3]:
        want = reference_drafts(target, draft, layout, tokens, len(drafts))  # type: ignore[arg-type]
        assert drafts == want, (len(tokens), drafts, want)
    assert_no_leaked_pages(engine)


@pytest.mark.parametrize("speculative", METHODS, indirect=True)
def test_many_requests_with_aborts_leak_no_pages(speculative) -> None:
    engine = speculative(num_draft_tokens=5, page_size=4, max_num_tokens=24)
    run_with_aborts(engine, PROMPTS, abort_at_step=5)


def test_speculative_config_eagle_and_mtp_through_the_server() -> None:
    """decoding_type Eagle with speculative_model_dir on a weights mount (found through the
    mount's file:// source) serves the same text as no speculation and reports
    speculation_rate; MTP on a checkpoint without NextN layers refuses to start, saying so."""
    import httpx
    from server_fixtures import REPO as SERVER_REPO
    from server_fixtures import serve_app, tiny_spec

    from bisllm_server.engine.config import EngineConfigError
    from bisllm_server.openai.launch import ServeOptions, build_server, resolve_model_dir
    from bisllm_truss.spec import SpeculationSpec, WeightsMount

    plain_spec = tiny_spec()
    eagle = SpeculationSpec(
        decoding_type="Eagle",
        max_draft_len=3,
        speculative_model_dir="/models/eagle/eagle3",
        num_nextn_predict_layers=None,
        eagle3_one_model=True,
    )
    mount = WeightsMount(source=f"file://{HEAD.parent}", mount_location="/models/eagle")
    eagle_spec = plain_spec.model_copy(
        update={"speculation": eagle, "weights": [*plain_spec.weights, mount]}
    )
    body = {"prompt": CODE[0], "max_tokens": 40, "temperature": 0}
    texts, rates = {}, {}
    for name, spec in (("plain", plain_spec), ("eagle", eagle_spec)):
        model_dir = resolve_model_dir(spec, [SERVER_REPO])
        app, engine = build_server(spec, model_dir, ServeOptions(device="cpu"))
        try:
            config = engine.engine.config
            assert config.speculative_method == (None if name == "plain" else "eagle")
            if name == "eagle":
                assert config.speculative_model == HEAD and config.num_draft_tokens == 3
            with serve_app(app) as url:
                response = httpx.post(url + "/v1/completions", json=body, timeout=120)
                assert response.status_code == 200, response.text
                texts[name] = response.json()["choices"][0]["text"]
                metrics = httpx.get(url + "/metrics", timeout=30).text
        finally:
            engine.shutdown()
        rates[name] = next(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("speculation_rate{")
        )
    assert texts["eagle"] == texts["plain"]
    assert rates["plain"] == 0 and 0 < rates["eagle"] <= 1

    mtp = eagle.model_copy(
        update={
            "decoding_type": "MTP",
            "speculative_model_dir": None,
            "num_nextn_predict_layers": 1,
            "eagle3_one_model": False,
        }
    )
    mtp_spec = plain_spec.model_copy(update={"speculation": mtp})
    with pytest.raises(EngineConfigError, match="needs the checkpoint's NextN layers"):
        build_server(mtp_spec, resolve_model_dir(mtp_spec, [SERVER_REPO]), ServeOptions())
