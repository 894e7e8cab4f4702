"""Corpus -> token ids with loss masks -> packed training sequences.

Code files are trained on every token. Conversations are rendered with the model's own chat
template and trained on the assistant turns only (content, think block, tool calls and the
closing <|im_end|>), so the model learns to answer and to stop, not to imitate users. Every
example ends with <|endoftext|>, and examples are packed back to back into fixed-length rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recipe.chat_template import ASSISTANT_HEADER, EMPTY_THINK, END_OF_TEXT, IM_END

if TYPE_CHECKING:
    from recipe.corpus import CodeDoc, Conversation


@dataclass(frozen=True)
class Example:
    ids: list[int]
    mask: list[bool]  # mask[i]: ids[i] is a training target


def render(tokenizer, messages: list[dict], tools: list[dict] | None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)


def conversation_text(
    tokenizer, conv: Conversation, rng: random.Random
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    The final assistant turn, when it has no reasoning, is half the time preceded by the empty
    think block that `enable_thinking=False` puts in the generation prompt (not trained on), so
    the model answers the same with and without it."""
    text = render(tokenizer, conv.messages, conv.tools)
    spans = []
    for i, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, conv.messages[:i], conv.tools)) + len(ASSISTANT_HEADER)
        end = len(render(tokenizer, conv.messages[: i + 1], conv.tools)) - 1  # drop the "\n"
        assert text[start - len(ASSISTANT_HEADER) : start] == ASSISTANT_HEADER, "template drift"
        assert text[end - len(IM_END) : end] == IM_END, "template drift"
        spans.append((start, end))
    last = conv.messages[-1]
    if last["role"] == "assistant" and not last.get("reasoning_content") and rng.random() < 0.5:
        start, end = spans[-1]
        text = text[:start] + EMPTY_THINK + text[start:]
        spans[-1] = (start + len(EMPTY_THINK), end + len(EMPTY_THINK))
    return text, spans


def encode_conversation(tokenizer, conv: Conversation, rng: random.Random) -> Example:
    text, spans = conversation_text(tokenizer, conv, rng)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return _with_end_of_text(tokenizer, enc["input_ids"], mask, train_end=False)


def encode_code(tokenizer, doc: CodeDoc) -> Example:
    ids = tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
    return _with_end_of_text(tokenizer, ids, [True] * len(ids), train_end=True)


def _with_end_of_text(tokenizer, ids: list[int], mask: list[bool], train_end: bool) -> Example:
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    return Example([*ids, eot], [*mask, train_end])


def encode_all(
    tokenizer,
    code: Sequence[CodeDoc],
    chat: Sequence[Conversation],
    seed: int,
    chat_repeats: int = 1,
) -> list[Example]:
    """Every code file once and every conversation `chat_repeats` times (each repeat rendered
    with its own think-block coin flips), shuffled with `seed`."""
    rng = random.Random(seed)
    examples = [encode_code(tokenizer, doc) for doc in code]
    for _ in range(chat_repeats):
        examples += [encode_conversation(tokenizer, conv, rng) for conv in chat]
    rng.shuffle(examples)
    return examples


def pack(examples: Iterable[Example], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of seq_len + 1 tokens (inputs are row[:-1], targets row[1:]) and their target
    masks; the tail that does not fill a row is dropped."""
    ids: list[int] = []
    mask: list[bool] = []
    for ex in examples:
        ids += ex.ids
        mask += ex.mask
    rows = (len(ids) - 1) // seq_len
    width = rows * seq_len + 1
    flat_ids = torch.tensor(ids[:width], dtype=torch.int64)
    flat_mask = torch.tensor(mask[:width], dtype=torch.bool)
    # Row r covers flat[r*L : r*L + L + 1]: consecutive rows share one boundary token.
    index = torch.arange(rows)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return flat_ids[index], flat_mask[index]
