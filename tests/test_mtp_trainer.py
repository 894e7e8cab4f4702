"""The MTP (NextN) layer trainer (examples/bisllm-tiny-moe/recipe/mtp.py) and the layer it
trained: training lowers the loss and repeats itself bit for bit, the saved tensors are
DeepSeek-V3's NextN layout around a Qwen3-MoE block, and the engine's MTP draft computes
exactly what the trainer's layer computes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from spec_heads import draft_hidden_states

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine

HERE = Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe"
sys.path.insert(0, str(HERE))

from recipe import mtp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COMMITTED = HERE / "mtp"
TARGET_CONFIG = json.loads((HERE / "checkpoint" / "config.json").read_text())
TINY = [
    "--steps", "8", "--batch-size", "2", "--window", "48", "--train-windows", "16",
    "--heldout-windows", "4", "--warmup", "2", "--lr", "3e-3", "--log-every", "1",
    "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"mtp_{name}")
        runs.append((out, mtp.train(mtp.parse_args([*TINY, "--out", str(out)]))))
    return runs


def test_a_tiny_run_lowers_the_loss_and_repeats_itself(tiny_runs):
    (a, record), (b, _) = tiny_runs
    log = [json.loads(line) for line in (a / "training_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(8))
    first, last = log[0]["step_losses"], log[-1]["step_losses"]
    for j in range(3):
        assert last[j] < first[j] - 0.5, (j, first, last)
    assert record["final_train_step_losses"] == last
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("which", ["tiny", "committed"])
def test_the_saved_layer_has_the_nextn_layout(which, tiny_runs):
    path = tiny_runs[0][0] if which == "tiny" else COMMITTED
    layers = TARGET_CONFIG["num_hidden_layers"]
    h = TARGET_CONFIG["hidden_size"]
    with safe_open(str(HERE / "checkpoint" / "model.safetensors"), framework="pt") as f:
        block = {
            name.removeprefix(f"model.layers.{layers - 1}."): tuple(f.get_slice(name).get_shape())
            for name in f.keys()  # noqa: SIM118
            if name.startswith(f"model.layers.{layers - 1}.")
        }
    expected = block | {
        "enorm.weight": (h,),
        "hnorm.weight": (h,),
        "eh_proj.weight": (h, 2 * h),
        "shared_head.norm.weight": (h,),
    }
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118
    assert found == {f"model.layers.{layers}.{name}": shape for name, shape in expected.items()}
    assert dtypes == {torch.bfloat16}


def test_the_engine_drafts_what_the_trainer_computes(tmp_path):
    """Step-1 logits of the committed layer at every position of a text: the trainer's unroll
    (from transformers' hidden states) and the engine's MtpDraft (from its own forward)."""
    checkpoint = mtp.assemble_checkpoint(tmp_path / "with_mtp")
    engine = LLMEngine(EngineConfig(model=checkpoint, dtype="float32", speculative_method="mtp"))
    tokens = engine.tokenizer.encode(
        "def mean(values):\n    return sum(values) / len(values)\n\n\ndef median(values):\n"
    )
    target, draft = engine.runner.model, engine.drafter.draft  # type: ignore[union-attr]
    mc = engine.model_config
    layout = (mc.num_kv_heads, mc.head_dim, mc.kv_value_dim, mc.kv_shared)
    hidden, _ = draft_hidden_states(target, draft, layout, tokens)  # type: ignore[arg-type]
    engine_logits = torch.nn.functional.linear(draft.layer.norm(hidden), draft._head)

    model, _ = mtp.load_target(HERE / "checkpoint")
    layer = mtp.load_layer(COMMITTED, model.config)
    embed = model.get_input_embeddings().weight.detach()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        final = model(input_ids=ids[:, :-1], output_hidden_states=True).hidden_states[-1]
        (trainer_logits,) = layer.unroll(final, embed[ids[:, 1:]], embed, steps=1)
    torch.testing.assert_close(engine_logits, trainer_logits[0], atol=2e-3, rtol=1e-3)
    assert torch.equal(engine_logits.argmax(-1), trainer_logits[0].argmax(-1))
