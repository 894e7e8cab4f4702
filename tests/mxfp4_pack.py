"""Test helper: MXFP4-quantize GPT-OSS checkpoints the way the hub's gpt-oss repositories store them.

`quantize_mxfp4` is an independent, plain reference of the format `bisllm_server.engine.mxfp4`
reads: per 32-value block the smallest power-of-two scale that fits the block's largest magnitude
in FP4's +-6, each value rounded to the nearest FP4 value, ties toward zero (to the smaller
magnitude). It computes in float64, so the rounded values it returns are exact.

`pack_gpt_oss_checkpoint` turns a saved unquantized GPT-OSS checkpoint into an MXFP4 one;
`dequantized_copy` writes the unquantized checkpoint that loading the MXFP4 one should give (the
expert weights replaced by their rounded values), the reference to compare against.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BLOCK = 32
MAX_EXPONENT = 127  # E8M0 byte 254; 255 is NaN
MIN_EXPONENT = -127  # E8M0 byte 0
# Magnitudes of FP4 codes 0-7; bit 3 of a code is the sign.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
EXPERT_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}

Rewrite = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def _round_to_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., n] -> (codes uint8 [..., n], block exponents int64 [..., n / 32], the rounded
    values as float64 [..., n])."""
    if w.dim() < 1 or w.shape[-1] % BLOCK:
        raise ValueError(f"last dimension of {tuple(w.shape)} is not a multiple of {BLOCK}")
    blocked = w.double().contiguous().view(*w.shape[:-1], -1, BLOCK)
    amax = blocked.abs().amax(dim=-1)
    # amax = m * 2**k with m in [0.5, 1); 6 * 2**e = 0.75 * 2**(e + 3), so the smallest e with
    # amax <= 6 * 2**e is k - 3 when m <= 0.75 and k - 2 otherwise (exact, no log2 rounding).
    mantissa, k = torch.frexp(amax)
    exponent = torch.where(mantissa <= 0.75, k - 3, k - 2).long()
    # An all-zero block, or one below what the smallest scale can resolve, takes that scale.
    exponent = torch.where(amax == 0, MIN_EXPONENT, exponent).clamp(min=MIN_EXPONENT)
    if exponent.max() > MAX_EXPONENT:
        raise ValueError("a block's magnitude exceeds what an E8M0 scale can reach")
    scaled = torch.ldexp(blocked, -exponent.unsqueeze(-1).double())
    grid = torch.tensor(FP4_MAGNITUDES, dtype=torch.float64)
    # bucketize(right=False) puts a value equal to a midpoint in the lower bucket: ties toward 0.
    magnitude_code = torch.bucketize(scaled.abs(), (grid[1:] + grid[:-1]) / 2)
    negative = scaled < 0
    codes = (magnitude_code + 8 * negative).to(torch.uint8)
    signed = torch.where(negative, -grid[magnitude_code], grid[magnitude_code])
    values = torch.ldexp(signed, exponent.unsqueeze(-1).double())
    return codes.reshape(w.shape), exponent, values.reshape(w.shape)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (blocks uint8 [..., out, in / 32, 16], scales uint8 [..., out, in / 32]):
    two codes a byte, the even element in the low nibble."""
    codes, exponent, _ = _round_to_grid(w)
    pairs = codes.reshape(*w.shape[:-1], -1, BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def mxfp4_rounded(w: torch.Tensor) -> torch.Tensor:
    """What quantize_mxfp4(w) dequantizes to, in w's dtype (exact: FP4 values times powers of
    two are representable in fp32 and bf16)."""
    return _round_to_grid(w)[2].to(w.dtype)


def _is_expert_weight(name: str) -> bool:
    return name.endswith(EXPERT_SUFFIXES)


def _pack_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if not _is_expert_weight(name):
        return {name: tensor}
    # The checkpoint holds [E, in, out]; MXFP4 blocks run along `in`, as [E, out, in / 32, 16].
    blocks, scales = quantize_mxfp4(tensor.transpose(-1, -2))
    return {f"{name}_blocks": blocks.contiguous(), f"{name}_scales": scales.contiguous()}


def _round_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if not _is_expert_weight(name):
        return {name: tensor}
    # Round along `in`, as packing does, then back to the checkpoint's [E, in, out].
    return {name: mxfp4_rounded(tensor.transpose(-1, -2)).transpose(-1, -2).contiguous()}


def _rewrite(src: Path, dst: Path, rewrite: Rewrite, quantized: bool) -> None:
    """Copy checkpoint `src` to `dst` with every safetensors tensor passed through `rewrite`;
    when `quantized`, config.json gains the MXFP4 quantization_config."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"), dirs_exist_ok=True)
    renamed: dict[str, list[str]] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in load_file(shard).items():
            out = rewrite(name, tensor)
            renamed[name] = list(out)
            tensors.update(out)
        save_file(tensors, dst / shard.name, metadata={"format": "pt"})
    index_path = src / "model.safetensors.index.json"
    if index_path.exists():
        # A sharded checkpoint's index must name the new tensors, in their old tensor's shard.
        index = json.loads(index_path.read_text())
        index["weight_map"] = {
            new: shard
            for old, shard in index["weight_map"].items()
            for new in renamed.get(old, [old])
        }
        (dst / index_path.name).write_text(json.dumps(index, indent=2))
    if quantized:
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = QUANTIZATION_CONFIG
        (dst / "config.json").write_text(json.dumps(config, indent=2))


def pack_gpt_oss_checkpoint(src: Path, dst: Path) -> None:
    """Write to `dst` the MXFP4 form of the unquantized GPT-OSS checkpoint `src`: each
    `*.mlp.experts.{gate_up_proj,down_proj}` becomes `_blocks` + `_scales`; every other tensor
    and file is copied unchanged, but for config.json's new quantization_config."""
    _rewrite(src, dst, _pack_tensor, quantized=True)


def dequantized_copy(src: Path, dst: Path) -> None:
    """Write to `dst` the unquantized checkpoint `src` with each expert weight replaced by what
    its MXFP4 form dequantizes to: what loading pack_gpt_oss_checkpoint(src) should give."""
    _rewrite(src, dst, _round_tensor, quantized=False)
