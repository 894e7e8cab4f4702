"""Multi-token-prediction (NextN) layers: loaded from the layers after the last decoder layer
when a checkpoint carries them, absent (and not required) when it does not, and refused when it
carries only part of one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bisllm_server.engine.loader import load_model
from bisllm_server.engine.models.weights import CheckpointMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mtp_tensors(checkpoint_dir: Path, hf_model) -> dict[str, torch.Tensor]:
    """An MTP layer in the hub layout: the last decoder layer's tensors, perturbed, plus the
    NextN projections and norms, as model.layers.{num_layers}.*"""
    config = json.loads((checkpoint_dir / "config.json").read_text())
    prefix = f"model.layers.{config['num_hidden_layers']}."
    gen = torch.Generator().manual_seed(11)
    hidden = config["hidden_size"]
    tensors = {
        prefix + name: (value + 0.01 * torch.randn(value.shape, generator=gen)).contiguous()
        for name, value in hf_model.model.layers[-1].state_dict().items()
    }
    tensors[prefix + "enorm.weight"] = 0.5 + torch.rand(hidden, generator=gen)
    tensors[prefix + "hnorm.weight"] = 0.5 + torch.rand(hidden, generator=gen)
    tensors[prefix + "shared_head.norm.weight"] = 0.5 + torch.rand(hidden, generator=gen)
    tensors[prefix + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=gen)
    # Some releases repeat the shared embedding and head inside the MTP layer.
    tensors[prefix + "embed_tokens.weight"] = hf_model.model.embed_tokens.weight.detach().clone()
    return tensors


def with_extra_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    save_file({**weights, **extra}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("variant", ["glm4_moe", "deepseek_v3"])
def test_mtp_layer_loads_when_present(variant, checkpoint, hf_model, tmp_path):
    src = checkpoint(variant)
    extra = mtp_tensors(src, hf_model(variant))
    path = with_extra_tensors(src, tmp_path / "with_mtp", extra)
    model = load_model(path, dtype="float32").model
    assert model.mtp is not None and len(model.mtp) == 1
    layer = model.mtp[0]
    prefix = f"model.layers.{model.config.num_layers}."
    assert torch.equal(layer.enorm.weight, extra[prefix + "enorm.weight"])
    assert torch.equal(layer.norm.weight, extra[prefix + "shared_head.norm.weight"])
    assert torch.equal(layer.eh_proj.weight, extra[prefix + "eh_proj.weight"])
    # The block is a full MoE decoder layer, fused like the main ones.
    block = layer.block
    if variant == "deepseek_v3":  # an MLA block, like the main layers
        assert torch.equal(
            block.self_attn.kv_b_proj.weight, extra[prefix + "self_attn.kv_b_proj.weight"]
        )
    else:
        q_rows = model.config.num_heads * model.config.head_dim
        assert torch.equal(
            block.self_attn.qkv_proj.weight[:q_rows], extra[prefix + "self_attn.q_proj.weight"]
        )
    assert torch.equal(
        block.mlp.gate.e_score_correction_bias, extra[prefix + "mlp.gate.e_score_correction_bias"]
    )
    assert torch.equal(block.mlp.experts.w2, extra[prefix + "mlp.experts.down_proj"])


def test_mtp_layer_absent_from_transformers_checkpoints(checkpoint):
    # transformers saves GLM without its MTP layer although the config announces one.
    path = checkpoint("glm4_moe")
    assert json.loads((path / "config.json").read_text()).get("num_nextn_predict_layers", 1) == 1
    assert load_model(path, dtype="float32").model.mtp is None


def test_partial_mtp_layer_is_refused(checkpoint, hf_model, tmp_path):
    src = checkpoint("glm4_moe")
    extra = mtp_tensors(src, hf_model("glm4_moe"))
    extra = {k: v for k, v in extra.items() if "eh_proj" not in k}
    path = with_extra_tensors(src, tmp_path / "partial_mtp", extra)
    with pytest.raises(CheckpointMismatchError, match=r"mtp\.0\.eh_proj\.weight"):
        load_model(path, dtype="float32")
