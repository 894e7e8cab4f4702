"""The shipped default model, examples/bisllm-tiny-moe: intact, loadable by transformers, and
served by the engine exactly as transformers generates (fp32 greedy)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe"
CHECKPOINT = HERE / "checkpoint"
sys.path.insert(0, str(HERE))

from recipe.evaluate import PROMPTS, prompt_text  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_TOKENS = 48


def sha256sums() -> dict[str, str]:
    lines = (HERE / "SHA256SUMS").read_text().splitlines()
    return {
        name.removeprefix("checkpoint/"): digest
        for digest, name in (line.split() for line in lines)
    }


def test_checkpoint_files_match_their_recorded_sha256():
    sums = sha256sums()
    shipped = {p.name for p in CHECKPOINT.iterdir()}
    assert set(sums) == shipped
    for name, digest in sums.items():
        assert hashlib.sha256((CHECKPOINT / name).read_bytes()).hexdigest() == digest, name


def test_checkpoint_is_a_small_real_moe():
    total = sum(p.stat().st_size for p in CHECKPOINT.iterdir())
    assert total <= 25 * 1024 * 1024, total
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    # transformers 5 writes the expert count as num_local_experts.
    experts = config.get("num_experts") or config["num_local_experts"]
    assert config["num_experts_per_tok"] >= 2 and experts > config["num_experts_per_tok"]
    tokenizer_config = json.loads((CHECKPOINT / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    generation = json.loads((CHECKPOINT / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]  # <|im_end|>, <|endoftext|>


@pytest.fixture(scope="module")
def transformers_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        CHECKPOINT, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval(), AutoTokenizer.from_pretrained(CHECKPOINT)


def test_engine_greedy_equals_transformers_on_the_model_card_prompts(transformers_model):
    from bisllm_server.engine.config import EngineConfig
    from bisllm_server.engine.engine import LLMEngine
    from bisllm_server.engine.sampling import SamplingParams

    model, tokenizer = transformers_model
    engine = LLMEngine(EngineConfig(model=CHECKPOINT, dtype="float32"))
    prompts = [prompt_text(tokenizer, item) for item in PROMPTS]
    ours = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    for prompt, result in zip(prompts, ours, strict=True):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS
            )
        theirs = out[0, ids.shape[1] :].tolist()
        assert result.token_ids == theirs, prompt
        assert result.finish_reason == ("stop" if len(theirs) < MAX_TOKENS else "length")
