"""Think-tag reasoning parser: complete parse, streaming that never leaks a marker fragment and
agrees with the complete parse for any split, and which models get which parser."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bisllm_server.openai.reasoning import (
    ReasoningParser,
    StripStream,
    marker_holdback,
    reasoning_parser_for,
)

CHECKPOINT = Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe" / "checkpoint"


def stream_all(parser: ReasoningParser, pieces: list[str]) -> list[tuple[str, str]]:
    stream = parser.stream()
    return [*(stream.feed(piece) for piece in pieces), stream.finish()]


def joined(outputs: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    reasoning = "".join(r for r, _ in outputs)
    content = "".join(c for _, c in outputs)
    return reasoning or None, content or None


# -- complete parse -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The embedded model's shape: markers on their own lines, a blank line after.
        ("<think>\nLet me add.\n</think>\n\n2 + 2 = 4.", ("Let me add.", "2 + 2 = 4.")),
        ("  \n<think>a</think>b", ("a", "b")),
        ("<think>\nStill thinking when cut off", ("Still thinking when cut off", None)),
        ("<think>\n\n</think>\n\nAnswer", (None, "Answer")),
        ("<think>only</think>\n", ("only", None)),
        ("Plain answer.", (None, "Plain answer.")),
        (
            "Answer with a <think>late tag</think> inside",
            (None, "Answer with a <think>late tag</think> inside"),
        ),
        ("<think>a</think>b<think>c</think>", ("a", "b<think>c</think>")),
        ("</think>stray end", (None, "</think>stray end")),
        ("", (None, None)),
        (" \n", (None, None)),
    ],
)
def test_parse(text: str, expected: tuple[str | None, str | None]) -> None:
    assert ReasoningParser().parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thinking...\n</think>\n\nAnswer", ("Thinking...", "Answer")),
        # R1-0528 repeats the opening tag itself: it is dropped, not kept as reasoning.
        ("<think>\nThinking\n</think>\nAnswer", ("Thinking", "Answer")),
        ("never closed", ("never closed", None)),
        ("</think>\n\nDirect answer", (None, "Direct answer")),
    ],
)
def test_starts_in_reasoning(text: str, expected: tuple[str | None, str | None]) -> None:
    assert ReasoningParser(starts_in_reasoning=True).parse(text) == expected


def test_other_markers() -> None:
    parser = ReasoningParser("<|begin_thought|>", "<|end_thought|>")
    assert parser.parse("<|begin_thought|>x<|end_thought|>y") == ("x", "y")
    with pytest.raises(ValueError):
        ReasoningParser("", "</think>")


# -- streaming ------------------------------------------------------------------------------


def test_marker_holdback_while_streaming() -> None:
    outputs = stream_all(ReasoningParser(), ["<th", "ink>x</th", "ink>y"])
    assert outputs == [("", ""), ("x", ""), ("", "y"), ("", "")]


def test_no_marker_fragment_is_ever_emitted() -> None:
    text = "<think>\nStep one.\nStep two.\n</think>\n\nThe answer."
    for size in range(1, 12):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        outputs = stream_all(ReasoningParser(), pieces)
        for reasoning, content in outputs:
            assert "<" not in reasoning and ">" not in reasoning
            assert "<" not in content and ">" not in content
        assert joined(outputs) == ("Step one.\nStep two.", "The answer.")


def test_partial_marker_at_the_end_is_text() -> None:
    assert stream_all(ReasoningParser(), ["<think>abc</th"]) == [("abc", ""), ("</th", "")]
    assert stream_all(ReasoningParser(), ["<thi"]) == [("", ""), ("", "<thi")]


def test_finish_twice_and_feed_after_finish() -> None:
    stream = ReasoningParser().stream()
    assert stream.feed("<think>a </th") == ("a", "")
    assert stream.finish() == (" </th", "")
    assert stream.finish() == ("", "")
    with pytest.raises(RuntimeError):
        stream.feed("b")


# Pieces with markers, their fragments, blanks and multi-byte characters.
PIECES = [
    "<think>",
    "</think>",
    "<th",
    "</th",
    "ink>",
    "<",
    ">",
    "/",
    "\n",
    "\n\n",
    " ",
    "a",
    "Thinking",
    "answer",
    "｜▁",
    "é",
]


@pytest.mark.parametrize("starts_in_reasoning", [False, True])
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_streaming_equals_parse(starts_in_reasoning: bool, data: st.DataObject) -> None:
    parser = ReasoningParser(starts_in_reasoning=starts_in_reasoning)
    text = data.draw(st.lists(st.sampled_from(PIECES), max_size=16).map("".join), label="text")
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=10), label="cuts")))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    whole = parser.parse(text)
    assert joined(stream_all(parser, pieces)) == whole
    assert joined(stream_all(parser, list(text))) == whole


# -- helpers --------------------------------------------------------------------------------


def test_marker_holdback() -> None:
    assert marker_holdback("abc</th", ["</think>"]) == 4
    assert marker_holdback("abc<", ["</think>", "<tool_call>"]) == 1
    assert marker_holdback("abc</think>", ["</think>"]) == 0  # a whole marker is not partial
    assert marker_holdback("abc", ["</think>"]) == 0
    assert marker_holdback("<｜tool▁", ["<｜tool▁calls▁begin｜>"]) == 7


@given(st.lists(st.text(st.sampled_from(" \n\tab"), max_size=5), max_size=8))
def test_strip_stream(pieces: list[str]) -> None:
    strip = StripStream()
    assert "".join(strip.feed(p) for p in pieces) == "".join(pieces).strip()


# -- which models get which parser ----------------------------------------------------------

QWEN3_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
QWEN3_THINKING_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
GLM_STYLE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
    "{%- if add_generation_prompt -%}<|assistant|>{{- '\n<think></think>' if (enable_thinking is"
    " defined and not enable_thinking) else '' -}}{%- endif -%}"
)
# DeepSeek-R1's shape: a namespace, tool sections, and an unconditional open think block.
R1_STYLE = (
    "{% set ns = namespace(is_tool=false, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{% set ns.is_tool = true %}"
    "{{ '<｜tool▁outputs▁begin｜>' + message['content'] }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def embedded_template() -> str:
    return json.loads((CHECKPOINT / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.parametrize(
    ("model_type", "template", "starts_in_reasoning"),
    [
        ("qwen3_moe", QWEN3_STYLE, False),
        ("qwen3_moe", QWEN3_THINKING_STYLE, True),
        ("glm4_moe", GLM_STYLE, False),
        ("deepseek_v3", R1_STYLE, True),
        ("deepseek_v3", "{{ raise_exception('unrenderable') }} <think>", False),
        ("some_model", "{% if %} broken <think>", False),
    ],
)
def test_reasoning_parser_for(model_type: str, template: str, starts_in_reasoning: bool) -> None:
    parser = reasoning_parser_for(model_type, template)
    assert parser is not None
    assert (parser.start, parser.end) == ("<think>", "</think>")
    assert parser.starts_in_reasoning is starts_in_reasoning


@pytest.mark.parametrize(
    ("model_type", "template"),
    [
        ("gpt_oss", "<|channel|>analysis <think>"),  # harmony: the gpt_oss tool parser splits it
        ("deepseek_v3", "{{ '<｜Assistant｜>' }}"),  # V3 without think tags
        ("mixtral", "[INST] {{ messages[0].content }} [/INST]"),
        ("qwen3_moe", None),
    ],
)
def test_no_reasoning_parser(model_type: str, template: str | None) -> None:
    assert reasoning_parser_for(model_type, template) is None


def test_for_prompt() -> None:
    parser = ReasoningParser()
    assert parser.for_prompt("<｜User｜>hi<｜Assistant｜><think>\n").starts_in_reasoning
    assert parser.for_prompt("<｜User｜>hi<｜Assistant｜><think>").starts_in_reasoning
    assert not parser.for_prompt("<｜User｜>hi<｜Assistant｜></think>").starts_in_reasoning
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert not parser.for_prompt(closed).starts_in_reasoning
    # A `<think>` that the user typed earlier in the prompt does not open the output's block.
    assert not parser.for_prompt(
        "user: what is <think>?\n<|im_start|>assistant\n"
    ).starts_in_reasoning


# -- the embedded model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(CHECKPOINT))


def test_embedded_model_gets_the_think_parser() -> None:
    parser = reasoning_parser_for("qwen3_moe", embedded_template())
    assert parser is not None
    assert not parser.starts_in_reasoning
    assert parser.parse("<think>\nHmm.\n</think>\n\nHi!") == ("Hmm.", "Hi!")


def test_embedded_model_thinking_off(tiny_tokenizer) -> None:
    """enable_thinking=False puts the empty think block in the prompt; the output is then plain
    content, with nothing mistaken for reasoning."""
    messages = [{"role": "user", "content": "Say hi."}]
    prompt = tiny_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    parser = reasoning_parser_for("qwen3_moe", tiny_tokenizer.chat_template)
    assert parser is not None
    parser = parser.for_prompt(prompt)
    assert not parser.starts_in_reasoning
    assert parser.parse("Hi there!") == (None, "Hi there!")
    assert joined(stream_all(parser, ["Hi", " there", "!"])) == (None, "Hi there!")


def test_embedded_model_reasoning_round_trip(tiny_tokenizer) -> None:
    """An assistant turn with reasoning, rendered by the model's template, parses back."""
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Add two and two."},
    ]
    rendered = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    generated = rendered.rsplit("<|im_start|>assistant\n", 1)[1].split("<|im_end|>", 1)[0]
    assert generated == "<think>\nAdd two and two.\n</think>\n\n4."
    assert ReasoningParser().parse(generated) == ("Add two and two.", "4.")
