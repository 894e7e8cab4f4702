"""Byte-level BPE tokenizer for bisllm-tiny-moe, trained with `tokenizers`.

Byte-level, like Qwen's: any text encodes, nothing maps to an unknown token. The ChatML
delimiters are special tokens (ids 0-2); the think / tool-call / tool-response tags are added
tokens that stay in decoded text, so the Qwen-style parsers find them.

Before BPE, text is split into pieces that no token crosses (PIECE_PATTERN). Line breaks are
never joined to the indentation after them: with GPT-2's split, which the first model used,
"\n" and the next line's indentation share one token, so a code prompt ending at a line break
("...docstring.\"\"\"\n") ends in a bare "\n" token that in training only ever comes before
an unindented line, and the model closed the function. Here a prompt that ends at a line break
is tokenized exactly as the same text is inside a training file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from recipe.chat_template import (
    CHAT_TEMPLATE,
    END_OF_TEXT,
    IM_END,
    MARKUP_TOKENS,
    SPECIAL_TOKENS,
)

# Pieces, in order of preference (the same split as Qwen2/Qwen3's tokenizers, without the
# English contractions, which would cut `'s` out of Python strings like 'spam'):
PIECE_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word, maybe one character before it: " return", "_line"
        r"\p{N}",  # one digit
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation, with the line breaks right after it: '):\n'
        r"\s*[\r\n]+",  # other line breaks, with any spaces before them
        r"\s+(?!\S)",  # indentation and other spaces, less the one a following word takes
        r"\s+",
    ]
)


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE over `texts` (deterministic for the same texts in the same order); `vocab_size`
    counts everything, the markup tokens (the last ids) included."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
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
