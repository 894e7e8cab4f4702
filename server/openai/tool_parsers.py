"""Tool-call parsers: a model's generated text → OpenAI `content`, `tool_calls` (and, for
GPT-OSS harmony, reasoning).

Pure text, no tokenizer. Each format is one incremental scanner; `parse` runs that same scanner
over the whole text, so the complete and the streamed results cannot disagree. While streaming,
text that may be the start of a marker is held back, and a call is buffered until its end marker
arrives, then sent whole (name and arguments in one `ToolCallDelta`). A call that never ends, or
that cannot be read, comes back as content: no generated text is ever dropped.

Content is the text outside calls, concatenated and stripped (None when blank).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bisllm_server.openai.reasoning import StripStream, marker_holdback

__all__ = [
    "TOOL_PARSERS",
    "ContentDelta",
    "DeepSeekV3ToolParser",
    "HarmonyToolParser",
    "HermesToolParser",
    "Llama4JsonToolParser",
    "ParsedMessage",
    "ReasoningDelta",
    "StreamEvent",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "ToolStream",
    "fold_events",
    "tool_parser_for",
]


@dataclass
class ToolCall:
    """One call: `arguments` is compact JSON of the model's object, or its raw text if that was
    not valid JSON (the client sees what the model wrote rather than nothing)."""

    name: str
    arguments: str


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str | None = None


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    """A streamed call: the first event of `index` carries `name`, later ones only argument text."""

    index: int
    name: str | None
    arguments: str


@dataclass
class ReasoningDelta:
    """Harmony's analysis channel (the think-tag families go through `reasoning.py` instead)."""

    text: str


StreamEvent = ContentDelta | ToolCallDelta | ReasoningDelta


def fold_events(events: list[StreamEvent]) -> ParsedMessage:
    """The message a client assembles from streamed events (what `parse` returns)."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, ToolCall] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif event.name is not None:
            calls[event.index] = ToolCall(event.name, event.arguments)
        else:
            calls[event.index].arguments += event.arguments
    return ParsedMessage(
        content="".join(content) or None,
        tool_calls=[calls[index] for index in sorted(calls)],
        reasoning="".join(reasoning) or None,
    )


def _arguments(raw: Any) -> str:
    """Compact JSON for an arguments value; text that is not a JSON object stays as written."""
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            return raw.strip()
        if not isinstance(value, dict):
            return raw.strip()
    else:
        value = raw
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# What a scanner step produces before ToolStream trims content and numbers calls.
_Item = ContentDelta | ReasoningDelta | ToolCall
_Step = tuple[int, list[_Item]] | None


class _Scanner(ABC):
    """One format's state machine over the not-yet-consumed text."""

    @abstractmethod
    def step(self, buf: str, final: bool) -> _Step:
        """Consume a prefix of `buf`: (characters consumed, items), or None when nothing more can
        be decided without more text. With `final`, there is no more text: the scanner must
        eventually consume everything. A step that consumes nothing must change state."""


class ToolStream:
    """Incremental `ToolParser.parse`: `feed` each delta, then `finish` once."""

    _MAX_IDLE_STEPS = 16  # guards against a scanner that stops making progress (a bug)

    def __init__(self, scanner: _Scanner) -> None:
        self._scanner = scanner
        self._buf = ""
        self._content = StripStream()
        self._reasoning = StripStream()
        self._calls = 0
        self._finished = False

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        """Flush held-back text; an unterminated call comes back as content."""
        if self._finished:
            return []
        events = self._drain(final=True)
        self._finished = True
        return events

    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        idle = 0
        while (result := self._scanner.step(self._buf, final)) is not None:
            used, items = result
            self._buf = self._buf[used:]
            idle = 0 if used else idle + 1
            if idle > self._MAX_IDLE_STEPS:
                raise RuntimeError(f"{type(self._scanner).__name__} stopped making progress")
            for item in items:
                self._emit(item, events)
        if final and self._buf:
            raise RuntimeError(f"{type(self._scanner).__name__} left text unconsumed")
        return events

    def _emit(self, item: _Item, events: list[StreamEvent]) -> None:
        if isinstance(item, ToolCall):
            events.append(ToolCallDelta(self._calls, item.name, item.arguments))
            self._calls += 1
            return
        trim, kind = (
            (self._content, ContentDelta)
            if isinstance(item, ContentDelta)
            else (self._reasoning, ReasoningDelta)
        )
        text = trim.feed(item.text)
        if not text:
            return
        # Merge with the previous event of the same kind: fewer, larger deltas.
        if events and type(events[-1]) is kind:
            events[-1].text += text  # type: ignore[union-attr]
        else:
            events.append(kind(text))


class ToolParser(ABC):
    """A model family's tool-call format. Stateless: one instance serves many requests."""

    name: ClassVar[str]

    def parse(self, text: str) -> ParsedMessage:
        """Content, calls (and harmony reasoning) of a complete generated text."""
        stream = self.stream()
        return fold_events(stream.feed(text) + stream.finish())

    def stream(self) -> ToolStream:
        return ToolStream(self._scanner())

    @abstractmethod
    def _scanner(self) -> _Scanner: ...


# -- hermes: <tool_call>{"name": ..., "arguments": {...}}</tool_call> -----------------------


class _TaggedScanner(_Scanner):
    """Content with calls between a begin and an end marker (hermes and the like); `read_call`
    turns a call's body into a ToolCall, or None if it cannot be read."""

    def __init__(self, begin: str, end: str, read_call: Callable[[str], ToolCall | None]) -> None:
        self.begin = begin
        self.end = end
        self.read_call = read_call
        self.in_call = False

    def step(self, buf: str, final: bool) -> _Step:
        if not self.in_call:
            index = buf.find(self.begin)
            if index >= 0:
                self.in_call = True
                return index + len(self.begin), [ContentDelta(buf[:index])]
            cut = len(buf) - (0 if final else marker_holdback(buf, (self.begin,)))
            return (cut, [ContentDelta(buf[:cut])]) if cut else None
        index = buf.find(self.end)
        if index >= 0:
            self.in_call = False
            body = buf[:index]
            call = self.read_call(body)
            raw = ContentDelta(self.begin + body + self.end)
            return index + len(self.end), [call if call is not None else raw]
        if final:  # unterminated: give the text back
            self.in_call = False
            return len(buf), [ContentDelta(self.begin + buf)]
        return None


_NAME_FIELD = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_FIELD = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def _json_call(text: str) -> ToolCall | None:
    """`{"name": ..., "arguments": {...}}` (also "parameters"); None if no name can be read.

    Invalid JSON still yields a call when the name and the arguments' start can be found: the
    arguments are then the raw text up to the object's closing brace.
    """
    text = text.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        name = _NAME_FIELD.search(text)
        args = _ARGUMENTS_FIELD.search(text)
        if name is None or args is None or not text.endswith("}"):
            return None
        return ToolCall(name.group(1), text[args.end() : -1].strip())
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], _arguments(args))


class HermesToolParser(ToolParser):
    """Hermes / Qwen2.5 / Qwen3 / the embedded model:
    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per call,
    newline-separated."""

    name = "hermes"

    def _scanner(self) -> _Scanner:
        return _TaggedScanner("<tool_call>", "</tool_call>", _json_call)


# -- DeepSeek V3 / R1 / V3.1 ------------------------------------------------------------------

_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALLS_END = "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
_DS_CALL_END = "<｜tool▁call▁end｜>"
_DS_SEP = "<｜tool▁sep｜>"
_CODE_FENCE = re.compile(r"\A\s*```[\w-]*[ \t]*\n?(.*?)\n?[ \t]*```\s*\Z", re.DOTALL)


def _deepseek_call(body: str) -> ToolCall | None:
    """V3/R1 `function<sep>NAME\\n```json\\n{...}\\n```` or V3.1 `NAME<sep>{...}`."""
    if _DS_SEP not in body:
        return None
    head, rest = body.split(_DS_SEP, 1)
    if head.strip() == "function":
        name, _, args = rest.partition("\n")
        fenced = _CODE_FENCE.match(args)
        args = fenced.group(1) if fenced else args
    else:
        name, args = head, rest
    name, args = name.strip(), args.strip()
    if not name:
        return None
    return ToolCall(name, _arguments(args) if args else "{}")


class _DeepSeekScanner(_Scanner):
    """Calls sit in a `calls_begin … calls_end` section. Until the section's first call is read,
    its opening marker (and anything after it) is only tentatively not content: a section that
    never yields a call is given back verbatim."""

    def __init__(self) -> None:
        self.state = "text"  # or "section", "call"
        self.pending: str | None = None  # raw section text while no call has been read

    def _outside_call(self, text: str) -> list[_Item]:
        """Section text between calls: content, or held while the section is still tentative."""
        if self.pending is not None:
            self.pending += text
            return []
        return [ContentDelta(text)]

    def _give_back(self) -> list[_Item]:
        raw, self.pending = self.pending, None
        self.state = "text"
        return [ContentDelta(raw)] if raw else []

    def step(self, buf: str, final: bool) -> _Step:
        if self.state == "text":
            index = buf.find(_DS_CALLS_BEGIN)
            if index >= 0:
                self.state, self.pending = "section", _DS_CALLS_BEGIN
                return index + len(_DS_CALLS_BEGIN), [ContentDelta(buf[:index])]
            cut = len(buf) - (0 if final else marker_holdback(buf, (_DS_CALLS_BEGIN,)))
            return (cut, [ContentDelta(buf[:cut])]) if cut else None
        if self.state == "section":
            call_at, end_at = buf.find(_DS_CALL_BEGIN), buf.find(_DS_CALLS_END)
            if call_at >= 0 and (end_at < 0 or call_at < end_at):
                self.state = "call"
                return call_at + len(_DS_CALL_BEGIN), self._outside_call(buf[:call_at])
            if end_at >= 0:
                items = self._outside_call(buf[:end_at])
                if self.pending is not None:  # an empty section: not a tool call after all
                    self.pending += _DS_CALLS_END
                    items = self._give_back()
                self.state = "text"
                return end_at + len(_DS_CALLS_END), items
            if final:
                return len(buf), self._outside_call(buf) + self._give_back()
            cut = len(buf) - marker_holdback(buf, (_DS_CALL_BEGIN, _DS_CALLS_END))
            return (cut, self._outside_call(buf[:cut])) if cut else None
        index = buf.find(_DS_CALL_END)
        if index < 0 and not final:
            return None
        self.state = "section"
        if index < 0:  # unterminated call at the end of the text
            return len(buf), self._outside_call(_DS_CALL_BEGIN + buf) + self._give_back()
        body = buf[:index]
        call = _deepseek_call(body)
        if call is None:
            return index + len(_DS_CALL_END), self._outside_call(
                _DS_CALL_BEGIN + body + _DS_CALL_END
            )
        items: list[_Item] = []
        if self.pending is not None:  # the section is real: drop its marker, keep other text
            items.append(ContentDelta(self.pending[len(_DS_CALLS_BEGIN) :]))
            self.pending = None
        items.append(call)
        return index + len(_DS_CALL_END), items


class DeepSeekV3ToolParser(ToolParser):
    """DeepSeek-V3/R1 (`function<｜tool▁sep｜>NAME` + a ```json fence) and V3.1 (`NAME<｜tool▁sep｜>`
    + raw JSON) calls inside `<｜tool▁calls▁begin｜>…<｜tool▁calls▁end｜>`."""

    name = "deepseek_v3"

    def _scanner(self) -> _Scanner:
        return _DeepSeekScanner()


# -- GPT-OSS harmony --------------------------------------------------------------------------

_H_MESSAGE = "<|message|>"
_H_START = "<|start|>"
# What ends a message body. `<|start|>` is not consumed: it opens the next message's header
# (it only ends a body when the model skipped the `<|end|>`).
_H_TERMINATORS = ("<|end|>", "<|return|>", "<|call|>", _H_START)
# How a header can begin: the first generated message follows the prompt's `<|start|>assistant`
# directly, so it opens with its channel or recipient.
_H_HEADER_OPENINGS = ("<|channel|>", _H_START, " to=", "to=", "<|constrain|>")
_H_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_H_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


class _HarmonyScanner(_Scanner):
    """Harmony messages: `[<|start|>role][<|channel|>ch][ to=R][<|constrain|>t]<|message|>body`
    ended by `<|end|>`, `<|return|>`, `<|call|>` or the end of the text."""

    def __init__(self) -> None:
        self.state = "header"  # or "body"
        self.kind = "content"  # of the current body: "content", "reasoning" or "call"
        self.header = ""  # raw header of the current body (given back if a call is unreadable)
        self.function = ""

    def step(self, buf: str, final: bool) -> _Step:
        if self.state == "header":
            return self._header(buf, final)
        at, terminator = _first_marker(buf, _H_TERMINATORS)
        if self.kind == "call":
            if at < 0 and not final:
                return None
            body = buf if at < 0 else buf[:at]
            used = len(buf) if at < 0 else at + (0 if terminator == _H_START else len(terminator))
            self.state = "header"
            if at < 0 and not _is_json(body):  # cut off mid-call (its `<|call|>` is a stop token)
                return used, [ContentDelta(self.header + _H_MESSAGE + body)]
            return used, [ToolCall(self.function, _arguments(body))]
        piece = ContentDelta if self.kind == "content" else ReasoningDelta
        if at >= 0:
            self.state = "header"
            return at + (0 if terminator == _H_START else len(terminator)), [piece(buf[:at])]
        cut = len(buf) - (0 if final else marker_holdback(buf, _H_TERMINATORS))
        return (cut, [piece(buf[:cut])]) if cut else None

    def _header(self, buf: str, final: bool) -> _Step:
        if not buf:
            return None
        if not any(buf.startswith(o) or o.startswith(buf) for o in _H_HEADER_OPENINGS):
            # Not harmony (or stray text between messages): plain content up to the next message.
            self.state, self.kind = "body", "content"
            return 0, []
        index = buf.find(_H_MESSAGE)
        if index < 0:
            return (len(buf), [ContentDelta(buf)]) if final else None
        self.header = buf[:index]
        channel = _H_CHANNEL.search(self.header)
        recipient = _H_RECIPIENT.search(self.header)
        if recipient is not None and recipient.group(1).startswith("functions."):
            self.kind, self.function = "call", recipient.group(1)[len("functions.") :]
        elif channel is not None and channel.group(1) == "analysis":
            self.kind = "reasoning"
        else:  # final, plain commentary (preambles), or anything unknown: the user sees it
            self.kind = "content"
        self.state = "body"
        return index + len(_H_MESSAGE), []


def _first_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    """(position, marker) of the earliest marker in `text`; (-1, "") if none."""
    found = [(at, marker) for marker in markers if (at := text.find(marker)) >= 0]
    return min(found) if found else (-1, "")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class HarmonyToolParser(ToolParser):
    """GPT-OSS harmony: analysis → reasoning, final and plain commentary → content, a message
    addressed `to=functions.NAME` → a call. Needs the text with special tokens kept.

    A call's `<|call|>` is a stop token, so the text may end right after its arguments: a
    complete JSON body at the end of the text is a call, a cut-off one is content."""

    name = "gpt_oss"

    def _scanner(self) -> _Scanner:
        return _HarmonyScanner()


# -- Llama 3.1+/Llama 4 JSON ------------------------------------------------------------------

_PYTHON_TAG = "<|python_tag|>"
_LLAMA_CALL_KEYS = {"type", "name", "parameters", "arguments"}


def _llama_calls(text: str) -> list[ToolCall] | None:
    """`[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]*`, or None if the whole text
    is not exactly that (then it is an ordinary answer, e.g. JSON the user asked for)."""
    text = text.strip()
    if text.startswith(_PYTHON_TAG):
        text = text[len(_PYTHON_TAG) :].lstrip()
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    at = 0
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("name"), str)
            or not {"parameters", "arguments"} & obj.keys()
            or not obj.keys() <= _LLAMA_CALL_KEYS
        ):
            return None
        calls.append(ToolCall(obj["name"], _arguments(obj.get("parameters", obj.get("arguments")))))
        at = len(text) - len(text[at:].lstrip())
        if text.startswith(";", at):
            at = len(text) - len(text[at + 1 :].lstrip())
    return calls or None


class _LlamaJsonScanner(_Scanner):
    """The message is either all calls or all content, decided by its first character; a
    would-be call is buffered to the end because only the whole text tells."""

    def __init__(self) -> None:
        self.state = "undecided"  # or "text", "json"

    def step(self, buf: str, final: bool) -> _Step:
        if self.state == "undecided":
            head = buf.lstrip()
            if head.startswith(("{", _PYTHON_TAG)):
                self.state = "json"
            elif not final and _PYTHON_TAG.startswith(head):
                return None
            else:
                self.state = "text"
            return 0, []
        if self.state == "text":
            return (len(buf), [ContentDelta(buf)]) if buf else None
        if not final:
            return None
        calls = _llama_calls(buf)
        self.state = "text"
        return len(buf), list(calls) if calls is not None else [ContentDelta(buf)]


class Llama4JsonToolParser(ToolParser):
    """Llama 3.1+/Llama 4 JSON calls: the whole message is `{"name", "parameters"}` objects,
    optionally after `<|python_tag|>`, separated by `;`."""

    name = "llama4_json"

    def _scanner(self) -> _Scanner:
        return _LlamaJsonScanner()


class ForcedJsonToolParser:
    """Output forced by the "json" tool-call grammar (structured.py) for families without a
    grammar of their native format: a JSON array of `{"name", "parameters"}` objects. The
    grammar guarantees the shape, so the whole text is read at once; a stream reports the
    calls when it finishes."""

    name = "forced_json"

    def parse(self, text: str) -> ParsedMessage:
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return ParsedMessage(content=text.strip() or None)
        if not isinstance(items, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str) for item in items
        ):
            return ParsedMessage(content=text.strip() or None)
        calls = [ToolCall(item["name"], _arguments(item.get("parameters", {}))) for item in items]
        return ParsedMessage(content=None, tool_calls=calls)

    def stream(self) -> _WholeTextStream:
        return _WholeTextStream(self)


class _WholeTextStream:
    """Buffers everything; `finish` emits what `parse` reads from the whole text."""

    def __init__(self, parser: ForcedJsonToolParser) -> None:
        self._parser = parser
        self._text: list[str] = []

    def feed(self, delta: str) -> list[StreamEvent]:
        self._text.append(delta)
        return []

    def finish(self) -> list[StreamEvent]:
        parsed = self._parser.parse("".join(self._text))
        events: list[StreamEvent] = [ContentDelta(parsed.content)] if parsed.content else []
        events += [
            ToolCallDelta(i, call.name, call.arguments) for i, call in enumerate(parsed.tool_calls)
        ]
        return events


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesToolParser, DeepSeekV3ToolParser, HarmonyToolParser, Llama4JsonToolParser)
}


def tool_parser_for(model_type: str, chat_template: str | None) -> ToolParser | None:
    """The parser for a model's native tool-call format, or None when it has none we know.

    The template decides where the family alone does not: DeepSeek-V3 checkpoints and their
    derivatives ship either DeepSeek's own tool tokens or a hermes-style template.
    """
    template = chat_template or ""
    if model_type == "gpt_oss":
        return HarmonyToolParser()
    if model_type in ("llama4", "llama4_text"):
        return Llama4JsonToolParser()
    if model_type in ("deepseek_v3", "kimi_k2") and "tool▁calls▁begin" in template:
        return DeepSeekV3ToolParser()
    if "<tool_call>" in template:
        return HermesToolParser()
    return None
