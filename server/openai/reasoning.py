"""Reasoning parsers: split a model's `<think>…</think>` block from its answer.

Pure text, no tokenizer: the server feeds decoded text, complete or as streamed deltas, and gets
back (reasoning, content). The streamed pieces, concatenated, equal what `parse` returns for the
whole text; both run the same state machine, so they cannot drift apart.

Also home to the two small streaming helpers the tool-call parsers share (`marker_holdback`,
`StripStream`): both modules must agree on how partial markers and whitespace are held back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

__all__ = [
    "ReasoningParser",
    "ReasoningStream",
    "StripStream",
    "marker_holdback",
    "reasoning_parser_for",
]


def marker_holdback(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`.

    A streamed delta can end halfway through a marker ("</th"); that tail must wait for the next
    delta before it is known to be text or marker.
    """
    longest = 0
    for marker in markers:
        for size in range(min(len(text), len(marker) - 1), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class StripStream:
    """Streams `text.strip()` of a text that arrives in pieces.

    Leading whitespace is dropped; trailing whitespace is held until something non-blank follows
    it (and dropped if nothing does), so the pieces returned concatenate to the stripped whole.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        out = self._held + body
        self._held = text[len(body) :]
        return out


# ReasoningStream states.
_START, _REASONING, _CONTENT = "start", "reasoning", "content"


class ReasoningParser:
    """Think-tag reasoning (Qwen3, GLM-4.5, DeepSeek-R1/V3.1, the embedded model).

    `starts_in_reasoning` means the prompt already opened the block (DeepSeek-R1's template ends
    with `<think>\\n`): everything before `end` is reasoning, and a repeated `start` is dropped.
    Otherwise text is reasoning only when it begins (after whitespace) with `start`. Only the first
    block counts; a later `<think>` is ordinary content.
    """

    def __init__(
        self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False
    ) -> None:
        if not start or not end:
            raise ValueError("reasoning markers must be non-empty")
        self.start = start
        self.end = end
        self.starts_in_reasoning = starts_in_reasoning

    def __repr__(self) -> str:
        return (
            f"ReasoningParser(start={self.start!r}, end={self.end!r}, "
            f"starts_in_reasoning={self.starts_in_reasoning})"
        )

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a complete text, markers and surrounding whitespace removed;
        None for an empty part. An unterminated think block is all reasoning."""
        stream = self.stream()
        reasoning, content = stream.feed(text)
        rest_reasoning, rest_content = stream.finish()
        return (reasoning + rest_reasoning) or None, (content + rest_content) or None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)

    def for_prompt(self, prompt: str) -> ReasoningParser:
        """This parser, with `starts_in_reasoning` set by the request's rendered prompt.

        Templates with a thinking switch (DeepSeek-V3.1's `thinking`, Qwen3-Thinking) decide per
        request whether the prompt ends inside an open `<think>`; the rendered prompt says so
        exactly, where the template alone only gives the default.
        """
        opened = prompt.rstrip().endswith(self.start)
        return ReasoningParser(self.start, self.end, starts_in_reasoning=opened)


class ReasoningStream:
    """Incremental `ReasoningParser.parse`: `feed` each delta, then `finish` once."""

    def __init__(self, parser: ReasoningParser) -> None:
        self._parser = parser
        self._buf = ""
        self._state = _START
        self._reasoning = StripStream()
        self._content = StripStream()
        self._finished = False

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) for a new piece of generated text."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back (a partial marker at the very end is plain text)."""
        if self._finished:
            return "", ""
        out = self._drain(final=True)
        self._finished = True
        return out

    def _drain(self, final: bool) -> tuple[str, str]:
        start, end = self._parser.start, self._parser.end
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state == _START:
                head = self._buf.lstrip()
                if head.startswith(start):
                    self._buf = head[len(start) :]
                    self._state = _REASONING
                    continue
                if not final and start.startswith(head):
                    break  # blank so far, or a partial `<think>`: undecided
                self._state = _REASONING if self._parser.starts_in_reasoning else _CONTENT
                continue
            if self._state == _REASONING:
                index = self._buf.find(end)
                if index >= 0:
                    reasoning.append(self._buf[:index])
                    self._buf = self._buf[index + len(end) :]
                    self._state = _CONTENT
                    continue
                keep = 0 if final else marker_holdback(self._buf, (end,))
                cut = len(self._buf) - keep
                reasoning.append(self._buf[:cut])
                self._buf = self._buf[cut:]
                break
            content.append(self._buf)
            self._buf = ""
            break
        return self._reasoning.feed("".join(reasoning)), self._content.feed("".join(content))


def reasoning_parser_for(model_type: str, chat_template: str | None) -> ReasoningParser | None:
    """The reasoning parser for a model, or None when its output has no think block.

    Any template that mentions `<think>` gets the think-tag parser (Qwen3, GLM-4.5, DeepSeek
    R1/V3.1, the embedded model). GPT-OSS reasoning lives in harmony channels and is split by the
    `gpt_oss` tool parser instead.
    """
    if model_type == "gpt_oss" or not chat_template or "<think>" not in chat_template:
        return None
    parser = ReasoningParser()
    prompt = _default_generation_prompt(chat_template)
    return parser.for_prompt(prompt) if prompt is not None else parser


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _default_generation_prompt(chat_template: str) -> str | None:
    """A one-user-turn prompt rendered with the template's defaults, or None if it won't render.

    Rendering (rather than searching the template source) is the reliable way to learn whether
    the generation prompt ends inside `<think>`: the Qwen3 template, for one, spells out a whole
    empty `<think>\\n\\n</think>` behind its `enable_thinking` switch.
    """
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # The environment transformers renders chat templates in (break/continue included).
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = time.strftime
        return env.from_string(chat_template).render(
            messages=[{"role": "user", "content": "Hello"}],
            add_generation_prompt=True,
            bos_token="",
            eos_token="",
        )
    except Exception:  # any template error: fall back to the default parser
        return None
