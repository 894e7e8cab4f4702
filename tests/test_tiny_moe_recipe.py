"""The bisllm-tiny-moe recipe: chat template conventions, loss masks, packing, and a seeded
training run that repeats itself exactly (the smoke preset: the full pipeline in seconds)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe"))

from recipe import train as train_module
from recipe.chat_template import EMPTY_THINK, IM_END, MARKUP_TOKENS
from recipe.corpus import CodeDoc, Conversation
from recipe.data import conversation_text, encode_code, encode_conversation, pack
from recipe.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GCD_TOOL = {
    "type": "function",
    "function": {
        "name": "gcd",
        "description": "Greatest common divisor.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
TOOL_CONVERSATION = Conversation(
    messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "gcd of 12 and 18?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "gcd", "arguments": {"a": 12, "b": 18}}},
                {"type": "function", "function": {"name": "gcd", "arguments": '{"a": 4, "b": 6}'}},
            ],
        },
        {"role": "tool", "content": "6"},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "It is 6.", "reasoning_content": "gcd(12, 18) = 6"},
    ],
    tools=[GCD_TOOL],
)


@pytest.fixture(scope="module")
def tokenizer():
    text = Path(json.__file__).read_text()
    return train_tokenizer([text, "It is 6. gcd of 12 and 18? Be brief."], vocab_size=700)


def test_tokenizer_vocab_and_markup_tokens(tokenizer):
    assert len(tokenizer) == 700
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer.encode("<tool_call>\n{}\n</tool_call><|im_end|>", add_special_tokens=False)
    # Markup tags are the last ids, single tokens, and survive skip_special_tokens;
    # <|im_end|> does not.
    markup = tokenizer.convert_tokens_to_ids(MARKUP_TOKENS)
    assert markup == list(range(700 - len(MARKUP_TOKENS), 700))
    assert ids[0] == markup[MARKUP_TOKENS.index("<tool_call>")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>\n{}\n</tool_call>"


def test_code_cut_at_a_line_break_tokenizes_as_the_start_of_the_whole(tokenizer):
    # A completion prompt ends at a line break; its tokens must be those the same text has
    # inside a longer file, or the model sees a token it never saw there (the first model,
    # with GPT-2's split, got a bare "\n" and closed the function).
    text = Path(json.__file__).read_text()[:8000]
    whole = tokenizer.encode(text, add_special_tokens=False)
    cuts = [i + 1 for i, ch in enumerate(text[:-1]) if ch == "\n" and text[i + 1] != "\n"]
    assert len(cuts) > 100
    for cut in cuts:
        part = tokenizer.encode(text[:cut], add_special_tokens=False)
        assert whole[: len(part)] == part, repr(text[max(0, cut - 40) : cut + 20])
    # A line break and the next line's indentation are separate tokens.
    tokens = tokenizer.convert_ids_to_tokens(whole)
    assert not [t for t in tokens if "\u010a\u0120" in t]  # byte-level "\n" then " "


def test_template_renders_qwen3_tool_calls_results_and_reasoning(tokenizer):
    text = tokenizer.apply_chat_template(
        TOOL_CONVERSATION.messages, tools=TOOL_CONVERSATION.tools, tokenize=False
    )
    tool_json = json.dumps(GCD_TOOL, ensure_ascii=False)
    assert text.startswith(
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions"
    )
    assert f"<tools>\n{tool_json}\n</tools>" in text
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "gcd", "arguments": {"a": 12, "b": 18}}\n</tool_call>\n<tool_call>\n'
        '{"name": "gcd", "arguments": {"a": 4, "b": 6}}\n</tool_call><|im_end|>\n'
    ) in text
    # Consecutive tool results share one user turn.
    assert (
        "<|im_start|>user\n<tool_response>\n6\n</tool_response>\n<tool_response>\n2\n"
        "</tool_response><|im_end|>\n"
    ) in text
    assert text.endswith(
        "<|im_start|>assistant\n<think>\ngcd(12, 18) = 6\n</think>\n\nIt is 6.<|im_end|>\n"
    )


def test_template_drops_old_reasoning_and_prefills_empty_think(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "again"},
    ]
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<think>" not in plain  # reasoning before the last user turn is not replayed
    assert plain.endswith("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")
    off = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off == plain + EMPTY_THINK


def test_conversation_mask_covers_exactly_the_assistant_turns(tokenizer):
    example = encode_conversation(tokenizer, TOOL_CONVERSATION, random.Random(0))
    trained = [tok for tok, m in zip(example.ids, example.mask, strict=True) if m]
    text = tokenizer.decode(trained)
    assert text == (
        "<tool_call>\n"
        '{"name": "gcd", "arguments": {"a": 12, "b": 18}}\n</tool_call>\n<tool_call>\n'
        '{"name": "gcd", "arguments": {"a": 4, "b": 6}}\n</tool_call><|im_end|>'
        "<think>\ngcd(12, 18) = 6\n</think>\n\nIt is 6.<|im_end|>"
    )
    assert example.ids[-1] == 0 and not example.mask[-1]  # <|endoftext|> closes, untrained


def test_empty_think_block_is_prompt_not_target(tokenizer):
    conv = Conversation(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tools=None,
    )
    seen = set()
    for seed in range(12):
        text, spans = conversation_text(tokenizer, conv, random.Random(seed))
        (start, end) = spans[-1]
        assert text[start:end] == "hello" + IM_END
        seen.add(EMPTY_THINK in text[:start])
    assert seen == {True, False}


def test_code_is_trained_everywhere_and_pack_rows_overlap_by_one(tokenizer):
    example = encode_code(tokenizer, CodeDoc(path="m.py", text="def f(x):\n    return x\n"))
    assert all(example.mask)
    rows, masks = pack([example] * 10, seq_len=8)
    flat = [t for _ in range(10) for t in example.ids]
    assert rows.shape == masks.shape == ((len(flat) - 1) // 8, 9)
    for r in range(rows.shape[0]):
        assert rows[r].tolist() == flat[r * 8 : r * 8 + 9]


def test_seeded_smoke_run_repeats_its_loss_curve(tmp_path):
    def run(seed: int) -> list[float]:
        args = train_module.parse_args(
            ["--preset", "smoke", "--seed", str(seed), "--log-every", "1"]
        )
        return [entry["loss"] for entry in train_module.train(args)]

    first, second, other = run(0), run(0), run(1)
    assert len(first) == train_module.PRESETS["smoke"]["steps"]
    assert first == second
    assert first != other
    assert first[-1] < first[0]  # it learns even in six steps


def test_smoke_run_writes_a_checkpoint_transformers_and_the_engine_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ckpt"
    train_module.main(["--preset", "smoke", "--out", str(out), "--loss-log", str(tmp_path / "l")])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "generation_config.json" in names and "recipe.json" in names
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert len((tmp_path / "l").read_text().splitlines()) >= 1
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts_per_tok >= 2
    ids = tok("def f(", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
