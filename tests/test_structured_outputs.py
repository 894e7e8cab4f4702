"""Grammar-constrained decoding (server/openai/structured.py) on the shipped default model.

The default model is tiny and weak: sampled at temperature 1.0 it rarely writes valid JSON on its
own, so every output below being valid, compact and finished ("stop", not "length") is the
grammar's doing.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.openai.structured import (
    GrammarCompiler,
    GrammarTokenRejectedError,
    StructuredOutputError,
)

CHECKPOINT = Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe" / "checkpoint"
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_TOKENS = 160
# Greedy, then three seeded draws at temperature 1.0, where the raw model produces garbage.
DECODINGS: list[dict[str, Any]] = [
    {"temperature": 0.0},
    {"temperature": 1.0, "seed": 1},
    {"temperature": 1.0, "seed": 2},
    {"temperature": 1.0, "seed": 3},
]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "address"],
}
SETTING = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "level": {"type": "integer", "minimum": -5, "maximum": 5},
        "enabled": {"type": "boolean"},
    },
    "required": ["color", "level", "enabled"],
}
ITEMS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "label": {"type": "string", "maxLength": 8},
        },
        "required": ["id", "label"],
    },
    "minItems": 1,
    "maxItems": 3,
}
WORD = {"type": "string", "maxLength": 10}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two small integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -100, "maximum": 100},
                    "b": {"type": "integer", "minimum": -100, "maximum": 100},
                },
                "required": ["a", "b"],
            },
        },
    },
]
TOOL_PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
HERMES_BLOCK = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model=CHECKPOINT, dtype="float32"))


@pytest.fixture(scope="module")
def compiler(engine: LLMEngine) -> GrammarCompiler:
    return GrammarCompiler(
        engine.tokenizer,
        engine.model_config.vocab_size,
        stop_token_ids=sorted(engine.eos_token_ids),
    )


def chat(engine: LLMEngine, text: str, **template: Any) -> str:
    messages = [{"role": "user", "content": text}]
    return engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template
    )


def constrained(
    engine: LLMEngine, compiler: GrammarCompiler, compiled: Any, prompt: str
) -> list[Any]:
    """One generation per DECODINGS entry, batched; each request gets its own matcher."""
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS, logits_processors=[compiler.new_processor(compiled)], **d
        )
        for d in DECODINGS
    ]
    return engine.generate([prompt] * len(params), params)


def assert_compact(text: str) -> None:
    outside_strings = JSON_STRING.sub('""', text)
    assert not re.search(r"\s", outside_strings), f"whitespace outside strings: {text!r}"


def hermes_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls in hermes-format text, checking that nothing else is there."""
    blocks = HERMES_BLOCK.findall(text)
    assert blocks, text
    assert text == "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks), text
    calls = [json.loads(b) for b in blocks]
    for call in calls:
        assert set(call) == {"name", "arguments"}, call
        jsonschema.validate(call["arguments"], TOOL_PARAMS[call["name"]])
    return calls


# -- response_format ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema", [PERSON, SETTING, ITEMS, WORD], ids=["nested", "enum", "array", "string"]
)
def test_json_schema_outputs_are_valid_compact_and_finished(engine, compiler, schema):
    prompt = chat(engine, f"Reply with JSON matching this schema: {json.dumps(schema)}")
    compiled = compiler.json_schema(schema)
    for decoding, out in zip(
        DECODINGS, constrained(engine, compiler, compiled, prompt), strict=True
    ):
        assert out.finish_reason == "stop", (decoding, out.text)
        value = json.loads(out.text)
        jsonschema.validate(value, schema)
        assert_compact(out.text)


def test_without_the_grammar_sampled_outputs_miss_the_schema(engine):
    """The control for the tests above: the same sampled decodings, unconstrained."""
    prompt = chat(engine, f"Reply with JSON matching this schema: {json.dumps(SETTING)}")
    params = [SamplingParams(max_tokens=48, **d) for d in DECODINGS if d["temperature"] > 0]
    for out in engine.generate([prompt] * len(params), params):
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(out.text), SETTING)


def test_json_object_output_is_a_compact_object(engine, compiler):
    compiled = compiler.json_object()
    # json_object bounds no length, and this weak model may write a number or key forever
    # (greedy on "Describe a cat..." does); this prompt's greedy object closes.
    prompt = chat(engine, "Give me a JSON object.")
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, logits_processors=[compiler.new_processor(compiled)]
    )
    (out,) = engine.generate([prompt], params)
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)
    assert_compact(out.text)


# -- forced tool calls -------------------------------------------------------------------


def tool_prompt(engine: LLMEngine) -> str:
    return chat(engine, "What is the weather in Paris, and what is 2 + 3?", tools=TOOLS)


def test_named_tool_choice_yields_exactly_one_call_to_that_tool(engine, compiler):
    # A named function means one call even where parallel calls are allowed.
    compiled = compiler.tool_calls(TOOLS, required_name="add", parallel=True, style="hermes")
    for out in constrained(engine, compiler, compiled, tool_prompt(engine)):
        assert out.finish_reason == "stop", out.text
        calls = hermes_calls(out.text)
        assert [c["name"] for c in calls] == ["add"]


def test_required_tool_choice_yields_at_least_one_valid_call(engine, compiler):
    compiled = compiler.tool_calls(TOOLS, required_name=None, parallel=True, style="hermes")
    for out in constrained(engine, compiler, compiled, tool_prompt(engine)):
        assert out.finish_reason == "stop", out.text
        assert len(hermes_calls(out.text)) >= 1


def test_required_without_parallel_calls_yields_exactly_one_call(engine, compiler):
    compiled = compiler.tool_calls(TOOLS, required_name=None, parallel=False, style="hermes")
    for out in constrained(engine, compiler, compiled, tool_prompt(engine)):
        assert out.finish_reason == "stop", out.text
        assert len(hermes_calls(out.text)) == 1


def test_hermes_grammar_accepts_several_calls_only_when_parallel(compiler):
    one = '<tool_call>\n{"name": "add", "arguments": {"a":1,"b":2}}\n</tool_call>'
    two = (
        one
        + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Oslo","unit":"celsius"}}\n</tool_call>'
    )
    for parallel, accepts_two in ((True, True), (False, False)):
        compiled = compiler.tool_calls(TOOLS, parallel=parallel)
        matcher = xgrammar.GrammarMatcher(compiled)
        assert matcher.accept_string(one) and matcher.is_completed()
        assert matcher.accept_string(two[len(one) :]) is accepts_two


def test_json_style_tool_calls_are_an_array_of_name_and_parameters(engine, compiler):
    compiled = compiler.tool_calls(TOOLS, required_name=None, parallel=False, style="json")
    for out in constrained(engine, compiler, compiled, tool_prompt(engine)):
        assert out.finish_reason == "stop", out.text
        calls = json.loads(out.text)
        assert isinstance(calls, list) and len(calls) == 1, out.text
        assert set(calls[0]) == {"name", "parameters"}
        jsonschema.validate(calls[0]["parameters"], TOOL_PARAMS[calls[0]["name"]])
        assert_compact(out.text)


# -- compile cache and the async path -----------------------------------------------------


def test_same_schema_is_compiled_once(compiler):
    first = compiler.json_schema(SETTING)
    hits = compiler.hits
    reordered = dict(reversed(list(copy.deepcopy(SETTING).items())))  # same schema, other order
    assert compiler.json_schema(reordered) is first
    assert compiler.hits == hits + 1
    # Tool descriptions do not shape the grammar, so they do not miss the cache either.
    described = copy.deepcopy(TOOLS)
    described[0]["function"]["description"] = "something else"
    assert compiler.tool_calls(described) is compiler.tool_calls(TOOLS)


def test_cache_evicts_the_least_recently_used_grammar(engine):
    gc = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, cache_size=2)
    first, second = gc.json_schema(WORD), gc.json_schema(SETTING)
    assert gc.json_schema(WORD) is first  # now the most recently used
    gc.json_schema(ITEMS)  # evicts SETTING
    assert gc.json_schema(WORD) is first
    assert gc.json_schema(SETTING) is not second
    assert (gc.hits, gc.misses) == (2, 4)


def test_async_compile_leaves_the_event_loop_free(engine):
    gc = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size, stop_token_ids=[2])
    started, release = threading.Event(), threading.Event()
    calls: list[bool] = []

    class GatedCompiler:
        """Holds each compile until the test's coroutine, on the loop, lets it finish."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def compile_grammar(self, grammar: Any) -> Any:
            started.set()
            # Had the compile run on the event loop thread, nothing could set `release`.
            calls.append(release.wait(timeout=10))
            return self.inner.compile_grammar(grammar)

    gc._compiler = GatedCompiler(gc._compiler)  # type: ignore[assignment]

    async def main() -> None:
        task = asyncio.create_task(gc.ajson_schema(PERSON))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        assert not task.done()  # this coroutine runs while the compile is in progress
        release.set()
        compiled = await task
        assert await gc.ajson_schema(PERSON) is compiled  # a hit: no second compile
        assert gc.json_schema(PERSON) is compiled

    try:
        asyncio.run(main())
    finally:
        gc.close()
    assert calls == [True]
    assert (gc.hits, gc.misses) == (2, 1)


# -- errors ------------------------------------------------------------------------------


def test_invalid_schema_is_a_clear_structured_output_error(compiler):
    with pytest.raises(
        StructuredOutputError, match=r'response_format.*Unsupported type "nonsense"'
    ):
        compiler.json_schema({"type": "nonsense"})
    with pytest.raises(StructuredOutputError, match="minimum greater than maximum"):
        compiler.json_schema({"type": "integer", "minimum": 5, "maximum": 1})
    with pytest.raises(StructuredOutputError, match="must be a JSON object"):
        compiler.json_schema(["not", "a", "schema"])  # type: ignore[arg-type]
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        compiler.json_schema({"enum": {1, 2}})
    with pytest.raises(StructuredOutputError, match="nonsense"):
        asyncio.run(compiler.ajson_schema({"type": "nonsense"}))
    assert issubclass(StructuredOutputError, ValueError)


def test_invalid_tools_name_the_offending_field(compiler):
    bad = copy.deepcopy(TOOLS)
    bad[1]["function"]["parameters"] = {"type": "object", "properties": {"a": {"type": "nope"}}}
    for style in ("hermes", "json"):
        with pytest.raises(
            StructuredOutputError, match=r"tools\[1\]\.function\.parameters \(add\)"
        ):
            compiler.tool_calls(bad, style=style)
    with pytest.raises(StructuredOutputError, match="tool_choice names function 'missing'"):
        compiler.tool_calls(TOOLS, required_name="missing")
    with pytest.raises(StructuredOutputError, match=r"tools\[0\]\.function\.name"):
        compiler.tool_calls([{"type": "function", "function": {"name": "bad name"}}])
    with pytest.raises(StructuredOutputError, match="defined twice"):
        compiler.tool_calls([TOOLS[0], TOOLS[0]])
    with pytest.raises(StructuredOutputError, match="non-empty list"):
        compiler.tool_calls([])
    with pytest.raises(StructuredOutputError, match="style"):
        compiler.tool_calls(TOOLS, style="pythonic")  # type: ignore[arg-type]


# -- the logits processor ----------------------------------------------------------------


def test_processor_masks_ids_beyond_the_tokenizer_vocab(engine):
    tokenizer = engine.tokenizer
    tok_vocab = len(tokenizer.get_vocab())
    padded = tok_vocab + 64  # a padded lm_head: rows no token string maps to
    gc = GrammarCompiler(tokenizer, padded, stop_token_ids=sorted(engine.eos_token_ids))
    compiled = gc.json_object()
    brace = tokenizer.convert_tokens_to_ids("{")
    # Logits wider still than the compiler was told: those ids must be masked too.
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.zeros(padded + 40, dtype=dtype)
        logits[tok_vocab:] = 100.0
        out = gc.new_processor(compiled)([], logits)
        assert torch.isneginf(out[tok_vocab:]).all()
        assert out[brace] == 0.0
        allowed = torch.isfinite(out).nonzero().flatten().tolist()
        assert all(tokenizer.decode([i]).startswith("{") for i in allowed), allowed


def test_processor_follows_history_then_allows_only_stop_tokens(engine, compiler):
    tokenizer = engine.tokenizer
    vocab = engine.model_config.vocab_size
    stops = sorted(engine.eos_token_ids)
    proc = compiler.new_processor(compiler.json_object())
    ids = tokenizer.encode('{"a":1}', add_special_tokens=False)

    def allowed(history: list[int]) -> list[int]:
        return torch.isfinite(proc(history, torch.zeros(vocab))).nonzero().flatten().tolist()

    after_first = allowed(ids[:1])
    allowed(ids[:3])
    assert allowed(ids[:1]) == after_first  # a shorter history rolls the matcher back
    assert allowed(ids) == stops  # complete: only the tokens that end the request
    assert allowed([*ids, stops[0]]) == stops and proc.is_terminated
    assert allowed([*ids, stops[0], stops[0]]) == stops  # ignore_eos keeps emitting stops
    with pytest.raises(GrammarTokenRejectedError, match="not allowed"):
        compiler.new_processor(compiler.json_object())(tokenizer.encode("x"), torch.zeros(vocab))
