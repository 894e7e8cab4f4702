"""Server-sent events as the router relays them: split into whole events (so an error the
router adds never lands inside one of the worker's), passed on with their bytes untouched, and
read in passing to see when output starts and how much flows."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

_SEPARATOR = b"\n\n"


class SSEEvents:
    """Whole events (each ending in a blank line) from a byte stream cut anywhere."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self.trailing = b""  # bytes after the last complete event when the stream ended

    def __aiter__(self) -> SSEEvents:
        return self

    async def __anext__(self) -> bytes:
        while True:
            end = self._buffer.find(_SEPARATOR)
            if end >= 0:
                event, self._buffer = (
                    self._buffer[: end + len(_SEPARATOR)],
                    self._buffer[end + len(_SEPARATOR) :],
                )
                return event
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self.trailing, self._buffer = self._buffer, b""
                raise
            self._buffer += chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk


def _payloads(event: bytes) -> list[Any]:
    out = []
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            out.append("[DONE]")
            continue
        try:
            out.append(json.loads(data))
        except ValueError:
            continue
    return out


def _choice_output(choice: dict[str, Any]) -> bool:
    if choice.get("finish_reason") is not None or choice.get("text"):
        return True
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def carries_output(event: bytes) -> bool:
    """True once the stream says something a retry could not take back: generated text, a
    finish, usage, an error or the end. A role-only opening chunk is not that."""
    for payload in _payloads(event):
        if payload == "[DONE]" or not isinstance(payload, dict):
            return True
        if "error" in payload:
            return True
        choices = payload.get("choices") or []
        if any(_choice_output(c) for c in choices if isinstance(c, dict)):
            return True
        if not choices and payload.get("usage") is not None:
            return True
    return False


def count_outputs(event: bytes) -> int:
    """Choices that advanced in this event (about one token each)."""
    count = 0
    for payload in _payloads(event):
        if isinstance(payload, dict):
            count += sum(
                1 for c in payload.get("choices") or [] if isinstance(c, dict) and _choice_output(c)
            )
    return count
