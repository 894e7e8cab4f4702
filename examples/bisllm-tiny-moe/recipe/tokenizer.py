"""Byte-level BPE tokenizer for bisllm-tiny-moe, trained with `tokenizers`.

Byte-level, like Qwen's: any text encodes, nothing maps to an unknown token. The ChatML
delimiters are special tokens (ids 0-2); the think / tool-call / tool-response tags are added
tokens that stay in decoded text, so the Qwen-style parsers find them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from recipe.chat_template import (
    CHAT_TEMPLATE,
    END_OF_TEXT,
    IM_END,
    MARKUP_TOKENS,
    SPECIAL_TOKENS,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE over `texts` (deterministic for the same texts in the same order); `vocab_size`
    counts everything, the markup tokens (the last ids) included."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Not special: decoding with skip_special_tokens keeps them for the parsers.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=SPECIAL_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json, the chat template inside the latter."""
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
