"""The released Llama 4 repositories are multimodal (`Llama4ForConditionalGeneration`): the
engine serves their text model from the `text_config` and the `language_model.` tensors, and
skips the vision tower's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bisllm_server.engine.loader import load_model


def _as_multimodal(src: Path, dst: Path) -> None:
    """`src`'s text checkpoint rewritten in the layout of the hub's Llama-4 repos."""
    shutil.copytree(src, dst)
    text = json.loads((src / "config.json").read_text())
    text.pop("architectures")
    eos, bos = text["eos_token_id"], text["bos_token_id"]
    config = dict(
        architectures=["Llama4ForConditionalGeneration"],
        model_type="llama4",
        text_config=text,  # the token ids live here only, as in the hub configs
        vision_config=dict(model_type="llama4_vision_model", hidden_size=16),
        image_token_index=200092,
        tie_word_embeddings=False,
    )
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "generation_config.json").unlink()
    tensors = {
        f"language_model.{name}": t for name, t in load_file(src / "model.safetensors").items()
    }
    tensors["vision_model.patch_embedding.linear.weight"] = torch.ones(16, 48)
    tensors["multi_modal_projector.linear_1.weight"] = torch.ones(64, 16)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    assert (eos, bos) == (0, 1)


def test_multimodal_checkpoint_loads_its_text_model(checkpoint, tmp_path):
    src = checkpoint("llama4")
    dst = tmp_path / "multimodal"
    _as_multimodal(src, dst)
    text_only, multimodal = load_model(src), load_model(dst)
    assert multimodal.config.architecture == "Llama4ForConditionalGeneration"
    assert multimodal.config.eos_token_ids == [0] and multimodal.config.bos_token_id == 1
    ours, expected = multimodal.model.state_dict(), text_only.model.state_dict()
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
