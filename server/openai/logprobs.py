"""Engine logprobs (token id, raw logprob, top list) in the two OpenAI shapes."""

from __future__ import annotations

import functools
from typing import Any


class TokenText:
    """Token id -> the text OpenAI reports for it (decoded alone, special tokens kept)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    names: TokenText,
    token_ids: list[int],
    logprobs: list[float | None],
    tops: list[list[tuple[int, float]] | None],
) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion (or the delta's, in a stream chunk)."""
    content = []
    for token, logprob, top in zip(token_ids, logprobs, tops, strict=True):
        entry = names.entry(token, logprob if logprob is not None else -9999.0)
        entry["top_logprobs"] = [names.entry(t, lp) for t, lp in top or []]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(
    names: TokenText,
    token_ids: list[int],
    logprobs: list[float | None],
    tops: list[list[tuple[int, float]] | None],
    text_offset: int,
) -> dict[str, Any]:
    """`choices[i].logprobs` of a legacy completion: parallel arrays. Each top list holds the
    chosen token too (clients check `token_logprob == max(top)` for greedy-ness)."""
    tokens, offsets, top_maps = [], [], []
    for token, logprob, top in zip(token_ids, logprobs, tops, strict=True):
        text = names.text(token)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        top_map = {names.text(t): lp for t, lp in top or []}
        if logprob is not None:
            top_map.setdefault(text, logprob)
        top_maps.append(top_map)
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs),
        "top_logprobs": top_maps,
        "text_offset": offsets,
    }
