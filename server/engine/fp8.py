"""Block-quantized FP8 checkpoints (DeepSeek-V3, Kimi-K2 Instruct): dequantized while loading.

Such a checkpoint stores each quantized linear weight W [out, in] as float8 (e4m3) with a
`<name>_scale_inv` fp32 tensor [ceil(out / bo), ceil(in / bi)] holding one multiplier per
bo x bi block (`quantization_config.weight_block_size`, [128, 128] in the released models):
W = fp8 value x the scale of its block. Norms, router, embeddings and head stay in bf16.

`dequantize_fp8_blocks` wraps the loader's tensor stream and yields each such weight in the
model dtype under its own name, so the rest of the loader never sees FP8. This is the CPU path;
a native-FP8 GPU path would instead pass the fp8 weight and its scales through to a block-scaled
GEMM, from the same pairing done here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from bisllm_server.engine.models.weights import CheckpointMismatchError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)


def fp8_block_size(hf_config: dict[str, Any]) -> tuple[int, int] | None:
    """(rows, cols) of a scale block for an FP8-quantized config.json, else None."""
    quant = hf_config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    if not block or len(block) != 2:
        raise CheckpointMismatchError(
            "quantization_config.weight_block_size must be [rows, cols] for a block-quantized "
            f"FP8 checkpoint, got {block!r} (per-tensor FP8 is not supported)"
        )
    return int(block[0]), int(block[1])


def dequantize(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    rows, cols = weight.shape
    block_rows, block_cols = block
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointMismatchError(
            f"FP8 scale of shape {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight in "
            f"{block_rows}x{block_cols} blocks (expected {expected})"
        )
    scales = scale_inv.float().repeat_interleave(block_rows, 0)[:rows]
    scales = scales.repeat_interleave(block_cols, 1)[:, :cols]
    return (weight.float() * scales).to(dtype)


def dequantize_fp8_blocks(
    tensors: Iterable[tuple[str, torch.Tensor]], block: tuple[int, int], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with every fp8 weight replaced by its dequantized `dtype` tensor and the
    scale tensors consumed. A weight waits for its scale (and vice versa) whichever comes
    first; an fp8 weight or a scale left unpaired at the end is an error."""
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name.endswith(SCALE_SUFFIX):
            base = name.removesuffix(SCALE_SUFFIX)
            if base in weights:
                yield base, dequantize(weights.pop(base), tensor, block, dtype)
            else:
                scales[base] = tensor
        elif tensor.dtype in FP8_DTYPES:
            if name in scales:
                yield name, dequantize(tensor, scales.pop(name), block, dtype)
            else:
                weights[name] = tensor
        else:
            yield name, tensor
    if weights or scales:
        unpaired = sorted(weights) + [f"{base}{SCALE_SUFFIX}" for base in sorted(scales)]
        shown = ", ".join(unpaired[:5]) + (" …" if len(unpaired) > 5 else "")
        raise CheckpointMismatchError(
            f"FP8 checkpoint has {len(unpaired)} weight(s) or scale(s) without their pair: {shown}"
        )
