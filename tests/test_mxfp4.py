"""MXFP4 (GPT-OSS) checkpoints: dequantization against transformers, the byte and scale
encodings, the loader's stream transform and a packed tiny GPT-OSS checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import mxfp4_pack
import pytest
import torch
from safetensors.torch import load_file

from bisllm_server.engine import mxfp4
from bisllm_server.engine.models.weights import CheckpointMismatchError
from bisllm_server.engine.mxfp4 import dequantize_mxfp4, dequantize_mxfp4_experts, is_mxfp4

# Written out here rather than imported, so a wrong table in either module shows up.
CODE_VALUES = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
EXPERTS = "model.layers.0.mlp.experts"


def random_packed(*lead: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(110, 141, lead, dtype=torch.uint8, generator=generator)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_chunk", [mxfp4.ROWS_PER_CHUNK, 7])
def test_matches_transformers(
    dtype: torch.dtype, rows_per_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # 7 rows a chunk: several chunks and a short last one.
    monkeypatch.setattr(mxfp4, "ROWS_PER_CHUNK", rows_per_chunk)
    blocks, scales = random_packed(3, 40, 5)
    ours = dequantize_mxfp4(blocks, scales, dtype)
    assert ours.shape == (3, 40, 160) and ours.dtype == dtype
    # transformers returns the [E, in, out] transpose.
    assert torch.equal(
        ours.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    )


def test_every_byte_decodes_to_its_nibble_pair() -> None:
    # 16 blocks of 16 bytes, scale 1: a [512] tensor, element 2b from byte b's low nibble.
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)
    values = dequantize_mxfp4(blocks, torch.full((16,), 127, dtype=torch.uint8), torch.float32)
    expected = torch.tensor(
        [
            value
            for byte in range(256)
            for value in (CODE_VALUES[byte % 16], CODE_VALUES[byte // 16])
        ]
    )
    assert torch.equal(values, expected)
    # torch.equal calls -0 and 0 equal; codes 8 and 0 must still differ in sign.
    assert torch.equal(values.signbit(), expected.signbit())


def test_every_scale_is_an_exact_power_of_two() -> None:
    ones = torch.full((256, 1, 16), 0x22, dtype=torch.uint8)  # every element code 2: 1.0
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(256, 1)
    values = dequantize_mxfp4(ones, scales, torch.float32)[:, 0]
    powers = torch.tensor([2.0**exponent for exponent in range(-127, 128)], dtype=torch.float32)
    assert torch.equal(values[:255], powers) and values[255].isnan()


def test_is_mxfp4() -> None:
    hub_quant = {"modules_to_not_convert": ["lm_head"], "quant_method": "mxfp4"}
    assert is_mxfp4({"quantization_config": hub_quant})
    assert not is_mxfp4({"quantization_config": {"quant_method": "fp8"}})
    assert not is_mxfp4({"quantization_config": None})
    assert not is_mxfp4({})


def test_values_on_the_grid_round_trip_exactly() -> None:
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (4, 24, 3, 32), generator=generator)
    codes[codes == 8] = 0  # -0 packs as +0
    codes[..., 5] = 7  # a 6 in every block pins its scale
    exponents = torch.randint(-30, 31, (4, 24, 3), generator=generator)
    w = torch.ldexp(torch.tensor(CODE_VALUES)[codes], exponents.unsqueeze(-1).float())
    blocks, scales = mxfp4_pack.quantize_mxfp4(w.view(4, 24, 96))
    assert torch.equal(scales, (exponents + 127).to(torch.uint8))
    assert torch.equal(blocks, (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8))
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), w.view(4, 24, 96))


def test_random_values_round_to_the_nearest_fp4_value() -> None:
    generator = torch.Generator().manual_seed(2)
    magnitude = torch.ldexp(torch.ones(8, 16, 1), torch.randint(-12, 12, (8, 16, 1)).float())
    w = (torch.randn(8, 16, 64, generator=generator) * magnitude).view(8, 16, 2, 32)
    w[0, 0, 0] = 0.0  # an all-zero block
    blocks, scales = mxfp4_pack.quantize_mxfp4(w.view(8, 16, 64))
    got = dequantize_mxfp4(blocks, scales, torch.float32).view(8, 16, 2, 32)
    assert torch.equal(got, mxfp4_pack.mxfp4_rounded(w))

    scale = torch.ldexp(torch.ones(()), scales.float() - 127).unsqueeze(-1)
    scaled_w, scaled_got = w.double() / scale, got.double() / scale
    grid = torch.tensor(CODE_VALUES, dtype=torch.float64)
    nearest = (scaled_w.unsqueeze(-1) - grid).abs().amin(dim=-1)
    assert torch.equal((scaled_w - scaled_got).abs(), nearest)
    # Largest gap between FP4 values is 2 (4 -> 6): never more than 1 scale unit off.
    assert (scaled_w - scaled_got).abs().max() <= 1
    # The scale is the smallest that fits: half of it would not hold the block's maximum.
    amax = scaled_w.abs().amax(dim=-1)
    nonzero = amax > 0
    assert (amax <= 6).all() and (amax[nonzero] > 3).all() and scales[0, 0, 0] == 0


def expert_tensors(dtype: torch.dtype = torch.uint8) -> dict[str, torch.Tensor]:
    gate_blocks, gate_scales = random_packed(2, 64, 1, seed=3)
    down_blocks, down_scales = random_packed(2, 32, 2, seed=4)
    return {
        f"{EXPERTS}.gate_up_proj_blocks": gate_blocks.to(dtype),
        f"{EXPERTS}.gate_up_proj_scales": gate_scales,
        f"{EXPERTS}.down_proj_blocks": down_blocks.to(dtype),
        f"{EXPERTS}.down_proj_scales": down_scales,
    }


def test_stream_pairs_in_either_order_and_passes_the_rest() -> None:
    t = expert_tensors()
    bias = torch.randn(2, 64)
    norm = torch.randn(32)
    stream = [
        (f"{EXPERTS}.gate_up_proj_blocks", t[f"{EXPERTS}.gate_up_proj_blocks"]),
        (f"{EXPERTS}.gate_up_proj_bias", bias),
        (f"{EXPERTS}.down_proj_scales", t[f"{EXPERTS}.down_proj_scales"]),
        (f"{EXPERTS}.gate_up_proj_scales", t[f"{EXPERTS}.gate_up_proj_scales"]),
        ("model.norm.weight", norm),
        (f"{EXPERTS}.down_proj_blocks", t[f"{EXPERTS}.down_proj_blocks"]),
    ]
    out = list(dequantize_mxfp4_experts(stream, torch.bfloat16))
    assert [name for name, _ in out] == [
        f"{EXPERTS}.gate_up_proj_bias",
        f"{EXPERTS}.gate_up_proj",
        "model.norm.weight",
        f"{EXPERTS}.down_proj",
    ]
    tensors = dict(out)
    assert tensors[f"{EXPERTS}.gate_up_proj_bias"] is bias and tensors["model.norm.weight"] is norm
    for proj, shape in (("gate_up_proj", (2, 32, 64)), ("down_proj", (2, 64, 32))):
        weight = tensors[f"{EXPERTS}.{proj}"]
        # [E, in, out], the unquantized checkpoint's layout.
        assert weight.shape == shape and weight.dtype == torch.bfloat16
        expected = dequantize_mxfp4(
            t[f"{EXPERTS}.{proj}_blocks"], t[f"{EXPERTS}.{proj}_scales"], torch.bfloat16
        )
        assert torch.equal(weight, expected.transpose(1, 2))


@pytest.mark.parametrize("missing", ["gate_up_proj_blocks", "down_proj_scales"])
def test_stream_rejects_unpaired(missing: str) -> None:
    t = expert_tensors()
    left = "down_proj_blocks" if missing == "down_proj_scales" else "gate_up_proj_scales"
    del t[f"{EXPERTS}.{missing}"]
    with pytest.raises(CheckpointMismatchError, match="without their pair") as error:
        list(dequantize_mxfp4_experts(t.items(), torch.float32))
    assert f"{EXPERTS}.{left}" in str(error.value) and missing not in str(error.value)


def test_stream_rejects_wrong_dtype() -> None:
    with pytest.raises(CheckpointMismatchError, match="must be uint8") as error:
        list(dequantize_mxfp4_experts(expert_tensors(torch.int8).items(), torch.float32))
    assert f"{EXPERTS}.gate_up_proj:" in str(error.value)


@pytest.mark.parametrize(
    ("blocks_shape", "scales_shape", "expected"),
    [
        ((2, 64, 2, 16), (2, 64, 1), r"do not fit blocks .* \(expected \(2, 64, 2\)"),
        ((2, 64, 1, 8), (2, 64, 1), "must end in 16 bytes"),
        ((64, 16), (64,), r"expected \[\.\.\., out, in / 32, 16\]"),
    ],
)
def test_stream_rejects_misshapen(
    blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...], expected: str
) -> None:
    stream = [
        (f"{EXPERTS}.down_proj_blocks", torch.zeros(blocks_shape, dtype=torch.uint8)),
        (f"{EXPERTS}.down_proj_scales", torch.zeros(scales_shape, dtype=torch.uint8)),
    ]
    with pytest.raises(CheckpointMismatchError, match=expected) as error:
        list(dequantize_mxfp4_experts(stream, torch.float32))
    assert f"{EXPERTS}.down_proj" in str(error.value)


@pytest.fixture(scope="module")
def gpt_oss_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(unquantized, packed, dequantized reference) tiny bf16 GPT-OSS checkpoint directories."""
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=320,
        hidden_size=64,
        # Not the hidden size, so a transposed [E, in, out] / [E, out, in] mix-up shows in shapes.
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=512,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=4.0,
            original_max_position_embeddings=128,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
        ),
    )
    torch.manual_seed(5)
    model = transformers.GptOssForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        # Init leaves biases at zero and weights in one narrow range: spread both, so scales
        # vary and pass-through tensors are worth comparing.
        for param in model.parameters():
            spread = torch.randint(-8, 8, param.shape).float().exp2()
            param.copy_(torch.randn(param.shape) * spread)
    root = tmp_path_factory.mktemp("gpt_oss")
    src, packed, reference = root / "src", root / "packed", root / "reference"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    mxfp4_pack.pack_gpt_oss_checkpoint(src, packed)
    mxfp4_pack.dequantized_copy(src, reference)
    return src, packed, reference


def test_packed_checkpoint_layout(gpt_oss_checkpoints: tuple[Path, Path, Path]) -> None:
    src, packed, _ = gpt_oss_checkpoints
    assert sorted(p.name for p in packed.iterdir()) == sorted(p.name for p in src.iterdir())
    for name in ("generation_config.json", "tokenizer_config.json"):
        assert (packed / name).read_bytes() == (src / name).read_bytes()
    config = json.loads((packed / "config.json").read_text())
    assert is_mxfp4(config) and config["quantization_config"]["modules_to_not_convert"]
    del config["quantization_config"]
    assert config == json.loads((src / "config.json").read_text())

    original = load_file(src / "model.safetensors")
    tensors = load_file(packed / "model.safetensors")
    assert tensors[f"{EXPERTS}.gate_up_proj_blocks"].shape == (8, 192, 2, 16)
    assert tensors[f"{EXPERTS}.gate_up_proj_scales"].shape == (8, 192, 2)
    assert tensors[f"{EXPERTS}.down_proj_blocks"].shape == (8, 64, 3, 16)
    assert tensors[f"{EXPERTS}.down_proj_scales"].shape == (8, 64, 3)
    experts = {name for name in original if name.endswith(("experts.gate_up_proj", "down_proj"))}
    assert len(experts) == 4
    for name in experts:
        assert tensors.pop(f"{name}_blocks").dtype == tensors.pop(f"{name}_scales").dtype
    assert tensors.keys() == original.keys() - experts
    assert all(torch.equal(tensors[name], original[name]) for name in tensors)


def test_packed_checkpoint_dequantizes_to_the_reference(
    gpt_oss_checkpoints: tuple[Path, Path, Path],
) -> None:
    src, packed, reference = gpt_oss_checkpoints
    expected = load_file(reference / "model.safetensors")
    ours = dict(
        dequantize_mxfp4_experts(load_file(packed / "model.safetensors").items(), torch.bfloat16)
    )
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(ours[name], tensor), name
    # The reference really is rounded: its experts moved, each by under a third of its block's
    # maximum (the scale is below amax / 3 and rounding moves a value by at most one scale).
    original = load_file(src / "model.safetensors")
    for name in (f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj"):
        # [E, in, out] -> blocks of 32 along `in`.
        rounded, exact = (
            t[name].float().transpose(1, 2).unflatten(-1, (-1, 32)) for t in (expected, original)
        )
        assert not torch.equal(rounded, exact)
        bound = exact.abs().amax(dim=-1, keepdim=True) / 3
        assert ((rounded - exact).abs() <= bound).all(), name


def test_transformers_loads_the_packed_checkpoint_alike(
    gpt_oss_checkpoints: tuple[Path, Path, Path],
) -> None:
    import transformers

    _, packed, _ = gpt_oss_checkpoints
    model = transformers.AutoModelForCausalLM.from_pretrained(
        packed,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    theirs = model.state_dict()
    ours = dict(
        dequantize_mxfp4_experts(load_file(packed / "model.safetensors").items(), torch.float32)
    )
    assert theirs.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor.float()), name


def test_engine_loads_a_packed_gpt_oss_checkpoint_like_its_dequantized_copy(
    checkpoint, tmp_path: Path
) -> None:
    """The engine on an MXFP4 checkpoint: the same parameters as from the unquantized copy
    of the rounded weights, and transformers' greedy tokens on that copy."""
    from engine_checkpoints import reference_greedy

    from bisllm_server.engine.config import EngineConfig
    from bisllm_server.engine.engine import LLMEngine
    from bisllm_server.engine.loader import load_model
    from bisllm_server.engine.sampling import SamplingParams

    source = checkpoint("gpt_oss")
    packed, reference = tmp_path / "packed", tmp_path / "reference"
    mxfp4_pack.pack_gpt_oss_checkpoint(source, packed)
    mxfp4_pack.dequantized_copy(source, reference)
    assert any(name.endswith("_blocks") for name in load_file(packed / "model.safetensors"))

    ours = load_model(packed, dtype="float32").model.state_dict()
    expected = load_model(reference, dtype="float32").model.state_dict()
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    # The rounding is real: the experts differ from the unquantized checkpoint's.
    original = load_model(source, dtype="float32").model.state_dict()
    assert not torch.equal(
        original["model.layers.0.mlp.experts.w13"], ours["model.layers.0.mlp.experts.w13"]
    )

    prompt = [11, 42, 7, 99, 123, 5, 64, 250, 17, 3, 8, 91]  # longer than the window (8)
    engine = LLMEngine(EngineConfig(model=packed, dtype="float32", num_kv_pages=32))
    (out,) = engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )
    assert out.token_ids == reference_greedy(reference, prompt, 24)
