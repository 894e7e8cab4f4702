"""Incremental detokenization: turn one new token id at a time into the text it adds.

Decoding a token alone loses context (SentencePiece leading spaces, byte-level BPE characters
split over several tokens), so we decode a short window before the new token and emit only the
difference, holding back while the tail is an incomplete UTF-8 sequence (vLLM's scheme).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Prompt tokens kept as context for the first output token.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        # False keeps markers such as GPT-OSS's <|channel|> that output parsers read.
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return after[len(before) :]
        return ""
