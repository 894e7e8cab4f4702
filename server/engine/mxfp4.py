"""MXFP4 checkpoints (GPT-OSS): the MoE expert weights dequantized while loading.

Such a checkpoint stores each expert projection of layer L as two uint8 tensors instead of
`model.layers.L.mlp.experts.{gate_up_proj,down_proj}`:

- `<name>_blocks` [E, out, in / 32, 16]: FP4 (E2M1) codes, two per byte, the low nibble holding
  the even element and the high nibble the odd one. Codes 0-7 are 0, .5, 1, 1.5, 2, 3, 4, 6 and
  codes 8-15 the same values negated (bit 3 is the sign).
- `<name>_scales` [E, out, in / 32]: one E8M0 exponent per 32-element block (one row of 16
  bytes): the block is multiplied by 2 ** (scale - 127); 255 is NaN.

The blocks are in [out, in] orientation, while the unquantized checkpoint (the bf16 model's
`save_pretrained`) stores the same weights transposed, as [E, in, out]. Attention, router,
embeddings, head and the expert biases stay in bf16 (`quantization_config.modules_to_not_convert`).

`dequantize_mxfp4_experts` wraps the loader's tensor stream and yields each expert weight in the
model dtype, in the unquantized layout, under its unquantized name, so the rest of the loader
never sees MXFP4. This is the CPU path; a native-MXFP4 GPU path would instead hand blocks and
scales to an MX-scaled grouped GEMM, from the same pairing done here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from bisllm_server.engine.models.weights import CheckpointMismatchError

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
BYTES_PER_BLOCK = 16  # 32 FP4 values
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Codes 8-15: bit 3 is the sign, so code 8 is -0.0.
FP4_VALUES = FP4_MAGNITUDES + tuple(-value for value in FP4_MAGNITUDES)
# Rows (32-value blocks) dequantized at once: bounds the int32 index and fp32 temporaries to a
# few MB however large the tensor (gpt-oss-120b: ~1 GB of packed experts per layer).
ROWS_PER_CHUNK = 1 << 16


def is_mxfp4(hf_config: dict[str, Any]) -> bool:
    """Whether config.json describes an MXFP4-quantized checkpoint."""
    quant = hf_config.get("quantization_config") or {}
    return quant.get("quant_method") == "mxfp4"


def _byte_table() -> torch.Tensor:
    """[256, 2] fp32: byte -> (value of its low nibble, value of its high nibble), so a lookup
    by byte yields the even and odd elements side by side, already in element order."""
    return torch.tensor(
        [(FP4_VALUES[byte & 0x0F], FP4_VALUES[byte >> 4]) for byte in range(256)],
        dtype=torch.float32,
    )


def _scale_table() -> torch.Tensor:
    """[256] fp32: E8M0 byte -> 2 ** (byte - 127). Every such power is exact in fp32 (2 ** -127
    as a subnormal), so multiplying an FP4 value by it is exact too, barring overflow."""
    return torch.tensor(
        [math.ldexp(1.0, byte - 127) for byte in range(255)] + [math.nan], dtype=torch.float32
    )


BYTE_TABLE = _byte_table()
SCALE_TABLE = _scale_table()


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """blocks [..., G, 16] and scales [..., G] (both uint8) as `dtype` values [..., G * 32], in
    the blocks' orientation. Each value is computed exactly in fp32 and rounded once to `dtype`,
    so fp32 and bf16 results are exact."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointMismatchError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}"
        )
    if blocks.dim() < 1 or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise CheckpointMismatchError(
            f"MXFP4 blocks of shape {tuple(blocks.shape)} must end in {BYTES_PER_BLOCK} bytes "
            "(32 FP4 values per block)"
        )
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointMismatchError(
            f"MXFP4 scales of shape {tuple(scales.shape)} do not fit blocks of shape "
            f"{tuple(blocks.shape)} (expected {tuple(blocks.shape[:-1])}, one per block)"
        )
    *lead, groups, _ = blocks.shape
    device = blocks.device
    byte_table, scale_table = BYTE_TABLE.to(device), SCALE_TABLE.to(device)
    rows = blocks.reshape(-1, BYTES_PER_BLOCK)
    row_scales = scales.reshape(-1)
    out = torch.empty(rows.shape[0], 2 * BYTES_PER_BLOCK, dtype=dtype, device=device)
    for start in range(0, rows.shape[0], ROWS_PER_CHUNK):
        stop = start + ROWS_PER_CHUNK
        # index_select wants int32/int64 indices (a uint8 index would be read as a mask); int32
        # per chunk keeps that copy small.
        pairs = byte_table.index_select(0, rows[start:stop].reshape(-1).int())
        values = pairs.view(-1, 2 * BYTES_PER_BLOCK)
        factors = scale_table.index_select(0, row_scales[start:stop].int()).unsqueeze(1)
        # fp32 product (exact), rounded once as it is written into `dtype`.
        torch.mul(values, factors, out=out[start:stop])
    return out.view(*lead, groups * 2 * BYTES_PER_BLOCK)


def dequantize_mxfp4_experts(
    tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with every `<base>_blocks` / `<base>_scales` pair replaced by `<base>` as a
    `dtype` tensor [..., in, out] (a transposed view: the unquantized checkpoint's layout); other
    tensors pass through unchanged. Blocks wait for their scales (and vice versa) whichever comes
    first; blocks or scales left unpaired at the end are an error."""
    pending_blocks: dict[str, torch.Tensor] = {}
    pending_scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith(BLOCKS_SUFFIX):
            base = name.removesuffix(BLOCKS_SUFFIX)
            if base in pending_scales:
                yield base, _dequantize_named(base, tensor, pending_scales.pop(base), dtype)
            else:
                pending_blocks[base] = tensor
        elif name.endswith(SCALES_SUFFIX):
            base = name.removesuffix(SCALES_SUFFIX)
            if base in pending_blocks:
                yield base, _dequantize_named(base, pending_blocks.pop(base), tensor, dtype)
            else:
                pending_scales[base] = tensor
        else:
            yield name, tensor
    if pending_blocks or pending_scales:
        unpaired = sorted(
            [f"{base}{BLOCKS_SUFFIX}" for base in pending_blocks]
            + [f"{base}{SCALES_SUFFIX}" for base in pending_scales]
        )
        shown = ", ".join(unpaired[:5]) + (" …" if len(unpaired) > 5 else "")
        raise CheckpointMismatchError(
            f"MXFP4 checkpoint has {len(unpaired)} blocks or scales without their pair: {shown}"
        )


def _dequantize_named(
    base: str, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    if blocks.dim() < 3:
        raise CheckpointMismatchError(
            f"{base}{BLOCKS_SUFFIX} of shape {tuple(blocks.shape)} is not a weight: expected "
            f"[..., out, in / 32, {BYTES_PER_BLOCK}]"
        )
    # The shared checks cannot know the tensor's name; a load error should say which one.
    try:
        weight = dequantize_mxfp4(blocks, scales, dtype)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{base}: {error}") from error
    return weight.transpose(-1, -2)
