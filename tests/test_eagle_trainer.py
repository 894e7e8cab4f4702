"""The EAGLE-3 draft-head trainer (examples/bisllm-tiny-moe/recipe/eagle.py) and the head it
trained: training lowers the loss, repeats itself bit for bit, unrolls the draft steps exactly
as inference chains them, and saves the released EAGLE-3 layout the engine loads."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

HERE = Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe"
sys.path.insert(0, str(HERE))

from recipe import eagle  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COMMITTED = HERE / "eagle3"
TARGET_CONFIG = json.loads((HERE / "checkpoint" / "config.json").read_text())

# A few seconds: short windows, a small draft vocabulary and MLP, a dozen steps.
TINY = [
    "--steps", "12", "--batch-size", "4", "--window", "64", "--train-windows", "24",
    "--heldout-windows", "4", "--draft-vocab", "256", "--intermediate-size", "128",
    "--warmup", "2", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    """Two tiny runs with the same seed, each saved to its own directory."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"eagle_{name}")
        runs.append((out, eagle.train(eagle.parse_args([*TINY, "--out", str(out)]))))
    return runs


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_tiny_run_lowers_the_loss(tiny_runs):
    out, record = tiny_runs[0]
    log = read_log(out / "training_log.jsonl")
    assert [entry["step"] for entry in log] == list(range(12))
    first, last = log[0]["step_losses"], log[-1]["step_losses"]
    assert len(first) == 3
    for j in range(3):  # every draft step learns, not just the first
        assert last[j] < first[j] - 0.5, (j, first, last)
    assert record["final_train_step_losses"] == last


def test_the_same_seed_gives_bit_identical_weights(tiny_runs):
    (a, record_a), (b, record_b) = tiny_runs
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()

    def without_times(log: list[dict]) -> list[dict]:
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]

    log_a, log_b = (read_log(out / "training_log.jsonl") for out in (a, b))
    assert without_times(log_a) == without_times(log_b)
    assert record_a["heldout"] == record_b["heldout"]


def check_layout(path: Path, intermediate: int, draft_vocab: int) -> None:
    """config.json and model.safetensors exactly as EAGLE-3 / SpecForge release them."""
    config = json.loads((path / "config.json").read_text())
    h, nh, nkv = (
        TARGET_CONFIG[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads")
    )
    hd, v = TARGET_CONFIG["head_dim"], TARGET_CONFIG["vocab_size"]
    assert config == {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": intermediate,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "head_dim": hd,
        "num_hidden_layers": 1,
        "rms_norm_eps": TARGET_CONFIG["rms_norm_eps"],
        "rope_theta": TARGET_CONFIG["rope_parameters"]["rope_theta"],
        "max_position_embeddings": TARGET_CONFIG["max_position_embeddings"],
        "vocab_size": v,
        "draft_vocab_size": draft_vocab,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 2]},
    }
    i, d = intermediate, draft_vocab
    expected = {
        "fc.weight": [h, 3 * h],
        "midlayer.input_layernorm.weight": [h],
        "midlayer.hidden_norm.weight": [h],
        "midlayer.self_attn.q_proj.weight": [nh * hd, 2 * h],
        "midlayer.self_attn.k_proj.weight": [nkv * hd, 2 * h],
        "midlayer.self_attn.v_proj.weight": [nkv * hd, 2 * h],
        "midlayer.self_attn.o_proj.weight": [h, nh * hd],
        "midlayer.post_attention_layernorm.weight": [h],
        "midlayer.mlp.gate_proj.weight": [i, h],
        "midlayer.mlp.up_proj.weight": [i, h],
        "midlayer.mlp.down_proj.weight": [h, i],
        "norm.weight": [h],
        "lm_head.weight": [d, h],
        "d2t": [d],
        "t2d": [v],
    }
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    assert {name: list(t.shape) for name, t in tensors.items()} == expected
    for name, t in tensors.items():
        want = {"d2t": torch.int64, "t2d": torch.bool}.get(name, torch.bfloat16)
        assert t.dtype == want, name
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    assert int(t2d.sum()) == d
    target_ids = torch.arange(d) + d2t
    assert bool(t2d[target_ids].all())
    assert len(set(target_ids.tolist())) == d
    assert bool(t2d[[0, 1, 2]].all())  # the specials are always draftable


def test_the_saved_checkpoint_has_the_eagle3_layout(tiny_runs):
    check_layout(tiny_runs[0][0], intermediate=128, draft_vocab=256)


def test_the_committed_head_has_the_eagle3_layout():
    config = json.loads((COMMITTED / "config.json").read_text())
    check_layout(COMMITTED, config["intermediate_size"], config["draft_vocab_size"])


def test_the_committed_head_reproduces_its_recorded_accuracy():
    recipe = json.loads((COMMITTED / "recipe.json").read_text())
    measured = eagle.evaluate_saved(COMMITTED)
    recorded = recipe["heldout"]
    assert measured["rows"] == recorded["rows"]
    # Threads and CPU code paths move the target's features by float rounding, which may flip
    # a near-tie argmax here and there; more than that would mean a different head or data.
    assert math.isclose(measured["top1"][0], recorded["top1"][0], abs_tol=0.005)
    assert measured["top1"][0] > 0.3  # far above chance: it is a trained head


def reference_chain(
    head: eagle.Eagle3Head,
    embed: torch.Tensor,
    aux: torch.Tensor,
    ids: torch.Tensor,
    anchor: int,
    steps: int,
) -> list[torch.Tensor]:
    """The engine's view, written from the checkpoint contract: after the target read
    t_0..t_{S-1} (S = anchor + 2), the draft's cache holds step-1 keys for positions 0..S-2;
    step j runs one query at position S + j - 3 over that cache plus the keys of its own earlier
    steps. The data token stands in for each draft token, as in training."""
    cfg = head.cfg
    layer = head.midlayer
    attn = layer.self_attn

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # x: [heads, T, hd]
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2) / cfg.head_dim)
        ang = pos[:, None].float() * inv[None, :]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        x1, x2 = x[..., : cfg.head_dim // 2], x[..., cfg.head_dim // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def project(e: torch.Tensor, g: torch.Tensor, pos: torch.Tensor):
        x = torch.cat(
            [norm(e, layer.input_layernorm.weight), norm(g, layer.hidden_norm.weight)], -1
        )
        q = (x @ attn.q_proj.weight.T).view(-1, cfg.num_attention_heads, cfg.head_dim)
        k = (x @ attn.k_proj.weight.T).view(-1, cfg.num_key_value_heads, cfg.head_dim)
        v = (x @ attn.v_proj.weight.T).view(-1, cfg.num_key_value_heads, cfg.head_dim)
        q, k, v = (z.transpose(0, 1) for z in (q, k, v))
        return rope(q, pos), rope(k, pos), v

    s = anchor + 2
    g_all = aux[: s - 1] @ head.fc.weight.T
    _, keys, values = project(embed[ids[1:s]], g_all, torch.arange(s - 1))
    g = g_all[-1:]
    out = []
    for j in range(1, steps + 1):
        pos = torch.tensor([anchor + j - 1])
        q, k, v = project(embed[ids[anchor + j : anchor + j + 1]], g, pos)
        if j > 1:  # step 1's own key is already the cache's last entry
            keys, values = torch.cat([keys, k], 1), torch.cat([values, v], 1)
        o = F.scaled_dot_product_attention(q[None], keys[None], values[None], enable_gqa=True)[0]
        h = g + o.transpose(0, 1).reshape(1, -1) @ attn.o_proj.weight.T
        n = norm(h, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        h = (
            h
            + (F.silu(n @ mlp.gate_proj.weight.T) * (n @ mlp.up_proj.weight.T))
            @ mlp.down_proj.weight.T
        )
        out.append(norm(h, head.norm.weight) @ head.lm_head.weight.T)
        g = h
    return out


def test_training_unrolls_the_draft_steps_as_inference_chains_them():
    torch.manual_seed(0)
    cfg = eagle.HeadConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
        vocab_size=40, draft_vocab_size=24,
    )  # fmt: skip
    head = eagle.init_head(cfg, torch.randn(24, 32), seed=0)
    with torch.no_grad():
        for param in head.parameters():  # far from init, so every term matters
            param.normal_(0, 0.3)
    length, steps = 10, 4
    aux, ids, embed = (
        torch.randn(1, length, 96),
        torch.randint(0, 40, (1, length + 1)),
        torch.randn(40, 32),
    )
    with torch.no_grad():
        unrolled = head.unroll(aux, eagle.draft_embeds(embed, ids, steps), steps)
        for anchor in range(length - steps):
            chained = reference_chain(head, embed, aux[0], ids[0], anchor, steps)
            for j in range(steps):
                torch.testing.assert_close(
                    unrolled[j][0, anchor], chained[j][0], atol=1e-5, rtol=1e-5
                )
