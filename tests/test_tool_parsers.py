"""Tool-call parsers: each format's complete parse, streaming that agrees with it for any split
of the text, and the embedded model's own rendered tool-call format."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bisllm_server.openai.tool_parsers import (
    TOOL_PARSERS,
    ContentDelta,
    DeepSeekV3ToolParser,
    HarmonyToolParser,
    HermesToolParser,
    Llama4JsonToolParser,
    ParsedMessage,
    ReasoningDelta,
    StreamEvent,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    fold_events,
    tool_parser_for,
)

CHECKPOINT = Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe" / "checkpoint"


def compact(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def dumps(obj: object) -> str:
    """JSON as a model writes it: spaced, non-ASCII kept (so texts hold ｜ and ▁ themselves)."""
    return json.dumps(obj, ensure_ascii=False)


def stream_events(parser: ToolParser, pieces: list[str]) -> list[StreamEvent]:
    stream = parser.stream()
    events: list[StreamEvent] = []
    for piece in pieces:
        events += stream.feed(piece)
    return events + stream.finish()


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted({min(c, len(text)) for c in cuts}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def check_events(events: list[StreamEvent]) -> None:
    """Well-formed stream: no empty text events, each call named first, indices in order."""
    seen: set[int] = set()
    for event in events:
        if isinstance(event, (ContentDelta, ReasoningDelta)):
            assert event.text
        else:
            assert isinstance(event, ToolCallDelta)
            if event.index not in seen:
                assert event.name is not None
                assert event.index == len(seen)
                seen.add(event.index)
            else:
                assert event.name is None


# -- hermes ---------------------------------------------------------------------------------


def hermes_call(name: str, args: object) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {dumps(args)}}}\n</tool_call>'


def test_hermes_single_call() -> None:
    text = hermes_call("get_weather", {"city": "Paris", "unit": "c"})
    assert HermesToolParser().parse(text) == ParsedMessage(
        content=None, tool_calls=[ToolCall("get_weather", '{"city":"Paris","unit":"c"}')]
    )


def test_hermes_parallel_calls_with_content_before() -> None:
    text = "Let me check both.\n" + hermes_call("a", {"x": 1}) + "\n" + hermes_call("b", {})
    parsed = HermesToolParser().parse(text)
    assert parsed.content == "Let me check both."
    assert parsed.tool_calls == [ToolCall("a", '{"x":1}'), ToolCall("b", "{}")]


def test_hermes_keeps_non_ascii_and_accepts_parameters_key() -> None:
    text = '<tool_call>{"name": "say", "parameters": {"text": "日本語 ｜▁"}}</tool_call>'
    assert HermesToolParser().parse(text).tool_calls == [ToolCall("say", '{"text":"日本語 ｜▁"}')]


def test_hermes_malformed_arguments_are_kept_raw() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>'
    assert HermesToolParser().parse(text).tool_calls == [ToolCall("f", '{"a": 1,}')]


def test_hermes_unreadable_call_is_content() -> None:
    text = "Before <tool_call>not json at all</tool_call> after"
    assert HermesToolParser().parse(text) == ParsedMessage(content=text, tool_calls=[])


def test_hermes_unterminated_call_is_content() -> None:
    text = 'Hi\n<tool_call>\n{"name": "f", "arguments": {"a"'
    assert HermesToolParser().parse(text) == ParsedMessage(content=text, tool_calls=[])


def test_hermes_complete_call_then_unterminated_one() -> None:
    text = hermes_call("a", {"x": 1}) + "\n<tool_call>\n{"
    parsed = HermesToolParser().parse(text)
    assert parsed.tool_calls == [ToolCall("a", '{"x":1}')]
    assert parsed.content == "<tool_call>\n{"


def test_hermes_plain_text_and_blank() -> None:
    assert HermesToolParser().parse("  Just an answer.\n") == ParsedMessage("Just an answer.", [])
    assert HermesToolParser().parse(" \n ") == ParsedMessage(None, [])
    assert HermesToolParser().parse("") == ParsedMessage(None, [])


def test_hermes_stream_holds_back_partial_marker() -> None:
    stream = HermesToolParser().stream()
    assert stream.feed("Hi <tool") == [ContentDelta("Hi")]
    assert stream.feed("_ca") == []
    assert stream.feed('ll>\n{"name": "f", "arguments": {}}') == []
    assert stream.feed("\n</tool_") == []
    assert stream.feed("call>") == [ToolCallDelta(0, "f", "{}")]
    assert stream.finish() == []


def test_hermes_stream_gives_back_a_false_marker() -> None:
    stream = HermesToolParser().stream()
    assert stream.feed("a <tool") == [ContentDelta("a")]
    assert stream.feed("box> b") == [ContentDelta(" <toolbox> b")]


def test_stream_finish_is_final() -> None:
    stream = HermesToolParser().stream()
    assert stream.feed("x <tool") == [ContentDelta("x")]
    assert stream.finish() == [ContentDelta(" <tool")]  # a marker that never came is text
    assert stream.finish() == []
    with pytest.raises(RuntimeError):
        stream.feed("y")


# -- DeepSeek V3 / V3.1 ---------------------------------------------------------------------

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def v3_call(name: str, args: object) -> str:
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{dumps(args)}\n```{CALL_END}"


def v31_call(name: str, args: object) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{dumps(args)}{CALL_END}"


def test_deepseek_v3_calls() -> None:
    text = (
        "I'll look.\n\n"
        + CALLS_BEGIN
        + v3_call("get_weather", {"city": "東京"})
        + "\n"
        + v3_call("get_time", {})
        + CALLS_END
    )
    assert DeepSeekV3ToolParser().parse(text) == ParsedMessage(
        content="I'll look.",
        tool_calls=[ToolCall("get_weather", '{"city":"東京"}'), ToolCall("get_time", "{}")],
    )


def test_deepseek_v31_calls() -> None:
    text = CALLS_BEGIN + v31_call("a", {"q": [1, 2]}) + v31_call("b", {"s": "x"}) + CALLS_END
    assert DeepSeekV3ToolParser().parse(text).tool_calls == [
        ToolCall("a", '{"q":[1,2]}'),
        ToolCall("b", '{"s":"x"}'),
    ]


def test_deepseek_malformed_arguments_are_kept_raw() -> None:
    text = CALLS_BEGIN + f"{CALL_BEGIN}f{SEP}{{'a': 1}}{CALL_END}" + CALLS_END
    assert DeepSeekV3ToolParser().parse(text).tool_calls == [ToolCall("f", "{'a': 1}")]


def test_deepseek_unterminated_section_is_content() -> None:
    text = "Hmm " + CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n{{"
    assert DeepSeekV3ToolParser().parse(text) == ParsedMessage(content=text, tool_calls=[])


def test_deepseek_complete_call_kept_when_section_is_cut_off() -> None:
    partial = f"{CALL_BEGIN}function{SEP}g\n```json\n{{"
    text = CALLS_BEGIN + v3_call("f", {"a": 1}) + partial
    parsed = DeepSeekV3ToolParser().parse(text)
    assert parsed.tool_calls == [ToolCall("f", '{"a":1}')]
    assert parsed.content == partial


def test_deepseek_section_without_calls_is_content() -> None:
    text = f"x {CALLS_BEGIN}{CALL_BEGIN}no separator{CALL_END}{CALLS_END} y"
    assert DeepSeekV3ToolParser().parse(text) == ParsedMessage(content=text, tool_calls=[])


def test_deepseek_plain_text() -> None:
    assert DeepSeekV3ToolParser().parse("The answer is 4.") == ParsedMessage("The answer is 4.", [])


# -- GPT-OSS harmony ------------------------------------------------------------------------


def test_harmony_analysis_then_final() -> None:
    text = (
        "<|channel|>analysis<|message|>User wants 2+2. Easy.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
    )
    assert HarmonyToolParser().parse(text) == ParsedMessage(
        content="2 + 2 = 4.", tool_calls=[], reasoning="User wants 2+2. Easy."
    )


def test_harmony_tool_call_after_analysis() -> None:
    text = (
        "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"location": "San Francisco"}<|call|>'
    )
    assert HarmonyToolParser().parse(text) == ParsedMessage(
        content=None,
        tool_calls=[ToolCall("get_weather", '{"location":"San Francisco"}')],
        reasoning="Need the weather tool.",
    )


def test_harmony_recipient_before_channel() -> None:
    text = (
        "<|channel|>commentary<|message|>Checking now.<|end|>"
        '<|start|>assistant to=functions.lookup<|channel|>commentary json<|message|>{"id": 7}'
        "<|call|>"
    )
    assert HarmonyToolParser().parse(text) == ParsedMessage(
        content="Checking now.", tool_calls=[ToolCall("lookup", '{"id":7}')]
    )


def test_harmony_first_message_addressed_to_a_function() -> None:
    # The prompt ends with `<|start|>assistant`, so the output may open with ` to=`.
    text = ' to=functions.f<|channel|>commentary <|constrain|>json<|message|>{"a": [1]}<|call|>'
    assert HarmonyToolParser().parse(text).tool_calls == [ToolCall("f", '{"a":[1]}')]


def test_harmony_call_without_its_stop_token() -> None:
    text = '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}'
    assert HarmonyToolParser().parse(text).tool_calls == [ToolCall("f", '{"a":1}')]


def test_harmony_cut_off_call_is_content() -> None:
    text = '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": '
    assert HarmonyToolParser().parse(text) == ParsedMessage(content=text.strip(), tool_calls=[])


def test_harmony_unterminated_final_and_plain_text() -> None:
    parser = HarmonyToolParser()
    assert parser.parse("<|channel|>final<|message|>Partial answ") == ParsedMessage(
        "Partial answ", []
    )
    assert parser.parse("No harmony tokens here.") == ParsedMessage("No harmony tokens here.", [])
    assert parser.parse("<|channel|>analysis<|message|>only thinking") == ParsedMessage(
        None, [], reasoning="only thinking"
    )


def test_harmony_stream_events() -> None:
    stream = HarmonyToolParser().stream()
    assert stream.feed("<|channel|>analysis<|mess") == []
    assert stream.feed("age|>Think<|e") == [ReasoningDelta("Think")]
    assert stream.feed("nd|><|start|>assistant<|channel|>final<|message|>Hi") == [
        ContentDelta("Hi")
    ]
    assert stream.feed("<|return|>") == []
    assert stream.finish() == []


# -- Llama JSON -----------------------------------------------------------------------------


def test_llama_single_and_python_tag() -> None:
    parser = Llama4JsonToolParser()
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    expected = [ToolCall("get_weather", '{"city":"Oslo"}')]
    assert parser.parse(text) == ParsedMessage(None, expected)
    assert parser.parse("<|python_tag|>" + text).tool_calls == expected
    assert parser.parse("\n " + text + "\n").tool_calls == expected


def test_llama_several_calls_separated_by_semicolons() -> None:
    text = (
        '<|python_tag|>{"name": "a", "parameters": {"s": "x; y"}}; '
        '{"type": "function", "name": "b", "arguments": {}};'
    )
    assert Llama4JsonToolParser().parse(text).tool_calls == [
        ToolCall("a", '{"s":"x; y"}'),
        ToolCall("b", "{}"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        '{"name": "Bob", "age": 3}',  # JSON the user asked for, not a call
        '{"name": "f", "parameters": {"a": 1}',  # cut off
        '{"name": "f", "parameters": {}} and some words',
        'Here: {"name": "f", "parameters": {}}',
    ],
)
def test_llama_non_calls_are_content(text: str) -> None:
    assert Llama4JsonToolParser().parse(text) == ParsedMessage(text, [])


def test_llama_stream_waits_only_for_json() -> None:
    stream = Llama4JsonToolParser().stream()
    assert stream.feed("  <|py") == []
    assert stream.feed('thon_tag|>{"name": "f", "parameters": {}}') == []
    assert stream.finish() == [ToolCallDelta(0, "f", "{}")]
    stream = Llama4JsonToolParser().stream()
    assert stream.feed("<") == []
    assert stream.feed("b>bold</b>") == [ContentDelta("<b>bold</b>")]


# -- choosing a parser ----------------------------------------------------------------------


def embedded_template() -> str:
    return json.loads((CHECKPOINT / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize(
    ("model_type", "template", "expected"),
    [
        ("qwen3_moe", "... <tool_call> ...", "hermes"),
        ("glm4_moe", "... <tool_call> ...", "hermes"),
        ("mixtral", "... <tool_call> ...", "hermes"),
        ("llama", "... <tool_call> ...", "hermes"),
        ("deepseek_v3", "{{'<｜tool▁calls▁begin｜>'}}", "deepseek_v3"),
        ("kimi_k2", "{{'<｜tool▁calls▁begin｜>'}}", "deepseek_v3"),
        ("deepseek_v3", "... <tool_call> ...", "hermes"),
        ("deepseek_v3", "no tools", None),
        ("gpt_oss", None, "gpt_oss"),
        ("llama4", "anything", "llama4_json"),
        ("llama4_text", None, "llama4_json"),
        ("some_new_model", "<tool_call>", "hermes"),
        ("mixtral", "[INST] plain", None),
        ("qwen3_moe", None, None),
    ],
)
def test_tool_parser_for(model_type: str, template: str | None, expected: str | None) -> None:
    parser = tool_parser_for(model_type, template)
    assert (parser.name if parser else None) == expected


def test_registry_and_embedded_model_choice() -> None:
    assert set(TOOL_PARSERS) == {"hermes", "deepseek_v3", "gpt_oss", "llama4_json"}
    assert all(cls.name == name for name, cls in TOOL_PARSERS.items())
    assert isinstance(tool_parser_for("qwen3_moe", embedded_template()), HermesToolParser)


# -- the embedded model's own format --------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def tiny_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(CHECKPOINT))


def assistant_part(rendered: str) -> str:
    """The last assistant turn's text, as the model would have generated it."""
    turn = rendered.rsplit("<|im_start|>assistant\n", 1)[1]
    return turn.split("<|im_end|>", 1)[0]


@pytest.mark.parametrize("content", [None, "Let me check."])
@pytest.mark.parametrize("as_string", [False, True])
def test_embedded_template_round_trip(tiny_tokenizer, content: str | None, as_string: bool) -> None:
    calls = [("get_weather", {"city": "Zürich", "unit": "c"}), ("get_weather", {"city": "Oslo"})]
    messages = [
        {"role": "user", "content": "Weather in Zürich and Oslo?"},
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": json.dumps(args, ensure_ascii=False) if as_string else args,
                    },
                }
                for i, (name, args) in enumerate(calls)
            ],
        },
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)
    generated = assistant_part(rendered)
    assert "<tool_call>\n{" in generated  # the format the parser reads
    parsed = HermesToolParser().parse(generated)
    assert parsed.content == content
    assert parsed.tool_calls == [ToolCall(name, compact(args)) for name, args in calls]
    streamed = fold_events(stream_events(HermesToolParser(), list(generated)))
    assert streamed == parsed


# -- streaming equals parsing, for any split ------------------------------------------------

# Pieces a generated text is assembled from: markers, their fragments, well- and ill-formed call
# bodies, multi-byte characters (str-level, so splits fall between any two of them), blanks.
COMMON = ["Hello", " world", "\n", "\n\n", "  ", "｜", "▁", "<", "|", ">", "{", "}", '"', ";", "é"]
FRAGMENTS: dict[str, list[str]] = {
    "hermes": [
        *COMMON,
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        "</tool_call",
        hermes_call("f", {"a": 1}),
        hermes_call("g", {"s": "｜▁ </tool_call"}),
        '{"name": "h", "arguments": {"x": [1, 2]}}',
        '{"name": "bad", "arguments": {"x": }}',
    ],
    "deepseek_v3": [
        *COMMON,
        CALLS_BEGIN,
        CALLS_END,
        CALL_BEGIN,
        CALL_END,
        SEP,
        "function",
        "<｜tool▁call",
        "<｜tool▁calls▁",
        CALLS_BEGIN + v3_call("f", {"a": "▁"}) + CALLS_END,
        v3_call("g", {}),
        v31_call("h", {"b": [True]}),
        "get_weather\n```json\n{}\n```",
    ],
    "gpt_oss": [
        *COMMON,
        "<|channel|>",
        "<|message|>",
        "<|start|>assistant",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|constrain|>json",
        "analysis",
        "final",
        "commentary",
        " to=functions.f",
        "<|channel|>analysis<|message|>think<|end|>",
        "<|start|>assistant<|channel|>final<|message|>answer<|return|>",
        '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>',
        '{"a": 1}',
        "<|mess",
    ],
    "llama4_json": [
        *COMMON,
        "<|python_tag|>",
        "<|python",
        '{"name": "f", "parameters": {"a": 1}}',
        '{"name": "g", "arguments": {}}',
        "; ",
        '"name"',
        ": ",
    ],
}


WORDS = st.lists(st.sampled_from(COMMON), max_size=4).map("".join)
NAMES = st.sampled_from(["f", "get_weather", "lookup_ｘ"])
ARGS = st.dictionaries(
    st.sampled_from(["a", "city", "ключ"]),
    st.one_of(st.integers(-5, 5), st.text(st.sampled_from('ab ｜▁<|>{}"\n;'), max_size=6)),
    max_size=3,
)


@st.composite
def messages(draw: st.DrawFn, family: str) -> str:
    """A well-formed message of the family's format (content, calls, harmony channels), often
    cut off at a random point as max_tokens would."""
    calls = draw(st.lists(st.tuples(NAMES, ARGS), max_size=3))
    if family == "hermes":
        body = "\n".join(hermes_call(name, args) for name, args in calls)
        text = draw(WORDS) + "\n" + body
    elif family == "deepseek_v3":
        style = draw(st.sampled_from([v3_call, v31_call]))
        body = draw(st.sampled_from(["", "\n"])).join(style(n, a) for n, a in calls)
        text = draw(WORDS) + (CALLS_BEGIN + body + CALLS_END if calls else "")
    elif family == "gpt_oss":
        parts = []
        for name, args in calls:
            header = draw(
                st.sampled_from(
                    [
                        f"<|channel|>commentary to=functions.{name} <|constrain|>json",
                        f" to=functions.{name}<|channel|>commentary json",
                    ]
                )
            )
            parts.append(f"{header}<|message|>{dumps(args)}<|call|>")
        words = draw(st.lists(WORDS, min_size=3, max_size=3))
        parts.insert(0, f"<|channel|>analysis<|message|>{words[0]}<|end|>")
        parts.insert(
            draw(st.integers(1, len(parts))), f"<|channel|>commentary<|message|>{words[1]}<|end|>"
        )
        parts.append(f"<|channel|>final<|message|>{words[2]}<|return|>")
        text = "<|start|>assistant".join(parts)
    else:
        tag = draw(st.sampled_from(["", "<|python_tag|>"]))
        key = draw(st.sampled_from(["parameters", "arguments"]))
        objs = [dumps({"name": name, key: args}) for name, args in calls]
        text = tag + draw(st.sampled_from([";", "; ", "\n;"])).join(objs) if calls else draw(WORDS)
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text


def texts(family: str) -> st.SearchStrategy[str]:
    soup = st.lists(st.sampled_from(FRAGMENTS[family]), max_size=14).map("".join)
    return st.one_of(soup, messages(family))


@pytest.mark.parametrize("family", sorted(TOOL_PARSERS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_streaming_equals_parse(family: str, data: st.DataObject) -> None:
    parser = TOOL_PARSERS[family]()
    text = data.draw(texts(family), label="text")
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10), label="cuts")
    whole = parser.parse(text)
    events = stream_events(parser, split_at(text, cuts))
    check_events(events)
    assert fold_events(events) == whole
    # One character at a time: every marker is split at every position.
    assert fold_events(stream_events(parser, list(text))) == whole


@pytest.mark.parametrize("family", ["hermes", "deepseek_v3", "llama4_json"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_no_text_is_lost_without_calls(family: str, data: st.DataObject) -> None:
    """Whatever is not read as a call comes back verbatim: with no calls, content is the text."""
    text = data.draw(texts(family), label="text")
    parsed = TOOL_PARSERS[family]().parse(text)
    if not parsed.tool_calls:
        assert parsed.content == (text.strip() or None)


def test_forced_json_calls_parse_whole_and_streamed() -> None:
    from bisllm_server.openai.tool_parsers import ForcedJsonToolParser

    text = '[{"name":"gcd","parameters":{"a":84,"b":36}},{"name":"lcm","parameters":{}}]'
    parsed = ForcedJsonToolParser().parse(text)
    assert parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("gcd", {"a": 84, "b": 36}),
        ("lcm", {}),
    ]
    stream = ForcedJsonToolParser().stream()
    assert all(stream.feed(text[i : i + 7]) == [] for i in range(0, len(text), 7))
    assert fold_events(stream.finish()) == parsed
    # Not the forced shape (a grammar bypassed): kept as content, never lost.
    assert ForcedJsonToolParser().parse('{"name": 1}').content == '{"name": 1}'
