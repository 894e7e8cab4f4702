"""`bisllm generate` on a tiny random qwen3_moe checkpoint, in process and as the real script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from engine_checkpoints import VOCAB_SIZE, reference_greedy
from transformers import AutoTokenizer

from bisllm_truss.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT_IDS = [5, 6, 7]
CLI_ARGS = ["--prompt-ids", "5,6,7", "--max-tokens", "12", "--ignore-eos", "--json"]
SUPPORTED = ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM", "Glm4MoeForCausalLM")


@pytest.fixture(scope="module")
def model_dir(checkpoint) -> Path:
    return checkpoint("qwen3_moe")


def transformers_greedy(model_dir: Path) -> list[int]:
    """transformers' greedy 12 tokens after PROMPT_IDS, going on past EOS (--ignore-eos)."""
    tokens = reference_greedy(model_dir, PROMPT_IDS, 12)
    assert len(tokens) == 12
    return tokens


@pytest.fixture(scope="module")
def greedy_reference(model_dir: Path) -> list[int]:
    return transformers_greedy(model_dir)


def generate(model_dir: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["generate", str(model_dir), *args])


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


# (a) token-id prompt vs transformers ------------------------------------------------------


def test_prompt_ids_json_matches_transformers_greedy(model_dir, greedy_reference):
    result = generate(model_dir, *CLI_ARGS)
    assert result.exit_code == 0, result.output
    data = last_json(result.stdout)
    assert data["token_ids"] == greedy_reference
    assert data["finish_reason"] == "length"
    assert data["num_prompt_tokens"] == len(PROMPT_IDS)
    assert data["num_cached_tokens"] == 0
    assert data["seconds"] >= 0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert data["text"] == tokenizer.decode(data["token_ids"], skip_special_tokens=True)


@pytest.mark.parametrize(
    "family", ["mixtral", "llama", "glm4_moe", "deepseek_v3", "gpt_oss", "llama4"]
)
def test_every_family_generates_like_transformers(family, checkpoint):
    path = checkpoint(family)
    result = generate(path, *CLI_ARGS)
    assert result.exit_code == 0, result.output
    assert last_json(result.stdout)["token_ids"] == transformers_greedy(path)


def test_prompt_ids_accept_spaces(model_dir, greedy_reference):
    result = generate(
        model_dir, "--prompt-ids", "5, 6, 7", "--max-tokens", "3", "--ignore-eos", "--json"
    )
    assert result.exit_code == 0, result.output
    assert last_json(result.stdout)["token_ids"] == greedy_reference[:3]


def test_streaming_output_without_json(model_dir):
    result = generate(model_dir, "--prompt-ids", "5,6,7", "--max-tokens", "4", "--ignore-eos")
    assert result.exit_code == 0, result.output
    assert "[4 tokens in " in result.stderr
    assert "finish_reason=length]" in result.stderr


# (b) text prompt ---------------------------------------------------------------------------


def test_text_prompt_goes_through_the_tokenizer(model_dir):
    result = generate(model_dir, "--prompt", "def main():", "--max-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    data = last_json(result.stdout)
    prompt_ids = AutoTokenizer.from_pretrained(model_dir).encode("def main():")
    assert data["num_prompt_tokens"] == len(prompt_ids) > 0
    assert 1 <= len(data["token_ids"]) <= 8
    assert all(0 <= t < VOCAB_SIZE for t in data["token_ids"])
    if data["finish_reason"] == "length":
        assert len(data["token_ids"]) == 8
    else:  # stopped at EOS, which is the last token
        assert data["finish_reason"] == "stop" and data["token_ids"][-1] == 0


# (c) seeded sampling -----------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model_dir, greedy_reference):
    args = ["--prompt-ids", "5,6,7", "--max-tokens", "16", "--ignore-eos", "--json"]
    seeded = [*args, "--temperature", "0.8", "--seed", "7"]
    first = generate(model_dir, *seeded)
    second = generate(model_dir, *seeded)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    ids = last_json(first.stdout)["token_ids"]
    assert len(ids) == 16
    assert last_json(second.stdout)["token_ids"] == ids
    # It did sample: (for this seed) the draw leaves the greedy path.
    assert ids[:12] != greedy_reference


# (d) errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [[], ["--prompt", "hi", "--prompt-ids", "1,2"], ["--chat", "hi", "--prompt", "x"]],
    ids=["neither", "both", "chat_and_prompt"],
)
def test_needs_exactly_one_prompt_option(model_dir, args):
    result = generate(model_dir, *args)
    assert result.exit_code == 2
    assert "exactly one of --prompt, --prompt-ids or --chat" in result.stderr


def test_system_needs_chat(model_dir):
    result = generate(model_dir, "--prompt", "hi", "--system", "be brief")
    assert result.exit_code == 2
    assert "--system goes with --chat" in result.stderr


def test_chat_renders_the_checkpoint_template(model_dir):
    """--chat is the same request as --prompt with the template applied by hand."""
    args = ["--max-tokens", "8", "--ignore-eos", "--json"]
    chat = generate(model_dir, "--chat", "hi", "--system", "be brief", *args)
    rendered = "system: be brief\nuser: hi\nassistant: "
    plain = generate(model_dir, "--prompt", rendered, *args)
    assert chat.exit_code == plain.exit_code == 0, chat.output
    ours, theirs = last_json(chat.stdout), last_json(plain.stdout)
    assert ours["token_ids"] == theirs["token_ids"]
    assert ours["num_prompt_tokens"] == theirs["num_prompt_tokens"] > 5


def test_malformed_prompt_ids_name_the_option(model_dir):
    result = generate(model_dir, "--prompt-ids", "1,x")
    assert result.exit_code == 2
    assert "--prompt-ids" in result.stderr
    assert "'1,x'" in result.stderr


def test_unsupported_architecture_lists_supported_ones(model_dir, tmp_path):
    gpt2 = Path(shutil.copytree(model_dir, tmp_path / "gpt2"))
    config = json.loads((gpt2 / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (gpt2 / "config.json").write_text(json.dumps(config))
    result = generate(gpt2, "--prompt-ids", "5,6,7")
    assert result.exit_code == 1
    assert "GPT2LMHeadModel" in result.stderr
    assert "supported architectures" in result.stderr
    for name in SUPPORTED:
        assert name in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("bad_id", [VOCAB_SIZE, 10_000, -1])
def test_prompt_id_outside_vocab_is_a_clear_error(model_dir, bad_id):
    result = generate(model_dir, "--prompt-ids", f"5,{bad_id}", "--max-tokens", "2")
    assert result.exit_code == 1, result.output
    assert f"token id {bad_id} is outside the vocabulary [0, {VOCAB_SIZE})" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_empty_prompt_ids_are_rejected(model_dir):
    result = generate(model_dir, "--prompt-ids", ",")
    assert result.exit_code == 1
    assert "at least one token" in result.stderr


def test_missing_model_dir_is_a_usage_error(tmp_path):
    result = generate(tmp_path / "nope", "--prompt-ids", "5")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


# (e) the installed console script ----------------------------------------------------------


def test_console_script_end_to_end(model_dir, greedy_reference):
    script = Path(sys.executable).with_name("bisllm")
    assert script.is_file(), (
        f"the package is installed with its console script next to {sys.executable}"
    )
    proc = subprocess.run(
        [str(script), "generate", str(model_dir), *CLI_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    data = last_json(proc.stdout)
    assert data["token_ids"] == greedy_reference
    assert data["finish_reason"] == "length"
