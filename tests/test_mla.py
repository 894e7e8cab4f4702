"""DeepSeek-V3 specifics: MLA's compressed KV cache, FP8 block-quantized checkpoints, Kimi-K2.

Logits and greedy tokens against transformers are checked with the other families in
test_engine_correctness.py and test_engine_bf16.py; this file covers what only DeepSeek has.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_checkpoints import reference_greedy
from safetensors.torch import load_file, save_file
from test_flagship_configs import DEEPSEEK_V3_1, KIMI_K2

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.fp8 import dequantize
from bisllm_server.engine.kv_cache import KVPool, bytes_per_page
from bisllm_server.engine.loader import load_model
from bisllm_server.engine.models import CheckpointMismatchError, resolve_architecture
from bisllm_server.engine.models.deepseek_v3 import (
    DeepseekV3ForCausalLM,
    yarn_softmax_scale_factor,
)
from bisllm_server.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = (16, 16)  # small blocks, so the tiny model's weights span several of them


def test_engine_caches_only_the_latent_and_rotary_key(checkpoint):
    path = checkpoint("deepseek_v3")
    engine = LLMEngine(EngineConfig(model=path, num_kv_pages=8))
    cfg = DeepseekV3ForCausalLM.parse_config(json.loads((path / "config.json").read_text()))
    pool = engine.kv_pool
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 32 + 8
    assert pool.shared_kv and pool.num_kv_heads == 1
    for k, v in zip(pool.k_buffers, pool.v_buffers, strict=True):
        assert k.shape == (pool.num_slots, 1, width)
        assert v.shape == (pool.num_slots, 1, cfg.kv_lora_rank)
        assert v.data_ptr() == k.data_ptr()  # V is a view of K's latent, not a copy
    itemsize = pool.k_buffers[0].element_size()
    allocated = cfg.num_layers * pool.num_slots * width * itemsize
    assert pool.buffer_bytes() == allocated
    assert pool.bytes_per_page * pool.num_pages == allocated
    # Expanded per-head K and V would take 4 heads x (24 + 24) values per token and layer.
    expanded = cfg.num_heads * (cfg.head_dim + cfg.v_head_dim)
    assert expanded / width == pytest.approx(4.8)
    (out,) = engine.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=4))
    assert len(out.token_ids) == 4


def test_flagship_kv_bytes_per_token():
    _, cls = resolve_architecture(DEEPSEEK_V3_1)
    cfg = cls.parse_config(DEEPSEEK_V3_1)
    heads, width, value, shared = cfg.kv_cache_layout
    assert (heads, width, value, shared) == (1, 576, 512, True)
    per_token = bytes_per_page(
        cfg.num_layers, heads, width, 1, torch.bfloat16, v_head_dim=value, shared_kv=shared
    )
    assert per_token == 61 * 576 * 2 == 70_272
    mha = bytes_per_page(cfg.num_layers, 128, 192, 1, torch.bfloat16, v_head_dim=128)
    assert mha == 61 * 128 * (192 + 128) * 2
    assert mha / per_token == pytest.approx(71.1, abs=0.05)


def test_shared_pool_pages_round_trip():
    pool = KVPool(2, 1, 40, 4, 4, torch.float32, "cpu", v_head_dim=32, shared_kv=True)
    for k in pool.k_buffers:
        k.copy_(torch.randn(k.shape))
    data = pool.export_pages([1, 3])
    assert data.shape == (2, 1, 2, 4, 1, 40)
    other = KVPool(2, 1, 40, 4, 4, torch.float32, "cpu", v_head_dim=32, shared_kv=True)
    other.import_pages([0, 2], data)
    for k, k2, v2 in zip(pool.k_buffers, other.k_buffers, other.v_buffers, strict=True):
        assert torch.equal(k2[0:4], k[4:8]) and torch.equal(k2[8:12], k[12:16])
        assert torch.equal(v2[0:4], k[4:8, :, :32])
    with pytest.raises(ValueError, match="data shape"):
        other.import_pages([0], torch.zeros(2, 2, 1, 4, 1, 40))


def test_yarn_softmax_scale_matches_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    for rope in (
        dict(rope_type="yarn", factor=40.0, mscale_all_dim=1.0),
        dict(rope_type="yarn", factor=64.0, mscale_all_dim=0.707),
        dict(rope_type="yarn", factor=4.0),  # no mscale_all_dim: unscaled
        dict(rope_type="default"),
    ):
        assert yarn_softmax_scale_factor(rope) == pytest.approx(yarn_apply_mscale(rope, 1.0))


def test_kimi_k2_model_type_is_deepseek_v3():
    name, cls = resolve_architecture({"model_type": "kimi_k2"})
    assert name == "DeepseekV3ForCausalLM"
    assert cls is resolve_architecture(KIMI_K2)[1]


def _quantize_blockwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 scale_inv per BLOCK, as DeepSeek's checkpoints store them;
    and their product, computed here independently of the engine's dequantizer)."""
    rows, cols = weight.shape
    br, bc = BLOCK
    grid = weight.new_zeros(-(-rows // br), -(-cols // bc))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            block = weight[i * br : (i + 1) * br, j * bc : (j + 1) * bc]
            grid[i, j] = block.abs().max().clamp(min=1e-12) / 448.0  # e4m3's largest value
    scales = grid.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    quantized = (weight / scales).to(torch.float8_e4m3fn)
    return quantized, grid, quantized.float() * scales


def _fp8_checkpoints(source: Path, tmp: Path) -> tuple[Path, Path, list[str]]:
    """(fp8 checkpoint, the same weights dequantized as a plain one, quantized names). The
    attention and expert projections are quantized; norms, router, embeddings and head not."""
    fp8_dir, plain_dir = tmp / "fp8", tmp / "dequantized"
    tensors = load_file(source / "model.safetensors")
    fp8, plain, quantized = {}, {}, []
    for name, tensor in tensors.items():
        if name.endswith("proj.weight") and tensor.dim() == 2:
            weight, scale_inv, dequantized = _quantize_blockwise(tensor.float())
            fp8[name], fp8[name + "_scale_inv"] = weight, scale_inv
            plain[name] = dequantized.to(tensor.dtype)
            quantized.append(name)
        else:
            fp8[name] = plain[name] = tensor
    for directory, weights in ((fp8_dir, fp8), (plain_dir, plain)):
        directory.mkdir()
        for extra in source.iterdir():
            if extra.name != "model.safetensors":
                (directory / extra.name).write_bytes(extra.read_bytes())
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=list(BLOCK)
    )
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, plain_dir, quantized


def test_fp8_block_checkpoint_loads_dequantized_and_matches_transformers(checkpoint, tmp_path):
    fp8_dir, plain_dir, quantized = _fp8_checkpoints(checkpoint("deepseek_v3"), tmp_path)
    assert any("experts" in n for n in quantized) and any("kv_b_proj" in n for n in quantized)
    loaded = load_model(fp8_dir, dtype="float32").model
    reference = load_model(plain_dir, dtype="float32").model
    for (name, ours), (_, theirs) in zip(
        loaded.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    # The quantization is real: the fp8 weights differ from the original ones.
    original = load_model(checkpoint("deepseek_v3"), dtype="float32").model
    assert not torch.equal(
        original.model.layers[1].self_attn.kv_b_proj.weight,
        loaded.model.layers[1].self_attn.kv_b_proj.weight,
    )

    prompt = [11, 42, 7, 99, 123, 5, 64, 250, 17]
    engine = LLMEngine(EngineConfig(model=fp8_dir, dtype="float32", num_kv_pages=32))
    (out,) = engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )
    assert out.token_ids == reference_greedy(plain_dir, prompt, 24)


def test_fp8_checkpoint_errors_name_the_tensor(checkpoint, tmp_path):
    fp8_dir, _, quantized = _fp8_checkpoints(checkpoint("deepseek_v3"), tmp_path)
    tensors = load_file(fp8_dir / "model.safetensors")
    name = quantized[0]
    del tensors[name + "_scale_inv"]
    save_file(tensors, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=f"without their pair: {name}"):
        load_model(fp8_dir)

    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = None
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="weight_block_size must be"):
        load_model(fp8_dir)


def test_fp8_scale_of_the_wrong_shape_is_refused():
    weight = torch.zeros(40, 20, dtype=torch.float8_e4m3fn)
    with pytest.raises(CheckpointMismatchError, match=r"expected \(3, 2\)"):
        dequantize(weight, torch.ones(2, 2), BLOCK, torch.float32)
