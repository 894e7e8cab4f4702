"""Build an engine model from a HF checkpoint directory (config.json + safetensors).

The model is created on the `meta` device (no memory), materialised uninitialised on the
target device, then each checkpoint tensor is streamed from safetensors and copied straight
into its parameter, so peak memory is the model plus one tensor. safetensors memory-maps the
files and hands out tensors that are views of the mapping (pages are read on first touch), so
each weight byte is read from disk once and copied once, into its parameter; nothing else
copies it. The load time and bytes read are reported on the result and logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from bisllm_server.engine.fp8 import dequantize_fp8_blocks, fp8_block_size
from bisllm_server.engine.models import (
    DecoderForCausalLM,
    UnsupportedModelError,
    resolve_architecture,
)
from bisllm_server.engine.models.weights import LazyTensor
from bisllm_server.engine.mxfp4 import dequantize_mxfp4_experts, is_mxfp4
from bisllm_server.engine.parallel.tensor_parallel import SINGLE, TPGroup, shard_model

log = logging.getLogger("bisllm.engine")

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


@dataclass
class ModelConfig:
    architecture: str
    model_type: str
    num_layers: int
    num_attention_heads: int
    # The KV cache's layout per token and layer (see DecoderConfig.kv_cache_layout): for MLA
    # one head of kv_lora_rank + qk_rope_head_dim, whose first kv_value_dim values are V.
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    dtype: torch.dtype
    kv_value_dim: int | None = None  # None: head_dim
    kv_shared: bool = False
    # The whole model's KV heads; num_kv_heads is this rank's share under tensor parallelism
    # (0: the same as num_kv_heads).
    kv_heads_total: int = 0

    @property
    def kv_heads_sharded(self) -> bool:
        """Whether this rank caches only some of the model's KV heads."""
        return 0 < self.num_kv_heads < self.kv_heads_total


@dataclass
class LoadedModel:
    model: DecoderForCausalLM
    config: ModelConfig
    load_seconds: float = 0.0
    bytes_read: int = 0  # checkpoint tensor bytes streamed from the files


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """bf16 / fp16 / fp32 given as a torch dtype or one of the names in DTYPES."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(
        f"unsupported dtype {dtype!r}; accepted: 'auto', {', '.join(DTYPES)} or the matching torch dtypes"
    )


def _read_json(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return json.load(f)


def _weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"no weights: neither {single} nor {index} exists")
    shards = sorted(set(_read_json(index)["weight_map"].values()))
    files = [model_dir / shard for shard in shards]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"weight shard {file} listed in {index} does not exist")
    return files


def _stream_tensors(
    files: list[Path], counter: list[int] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the files, as views of their memory maps; `counter[0]` sums bytes."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if counter is not None:
                    counter[0] += tensor.nbytes
                yield name, tensor


def _stream_lazy(files: list[Path], counter: list[int]) -> Iterator[tuple[str, LazyTensor]]:
    """Every tensor of the files, unread: a tensor-parallel rank reads only its slice."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, LazyTensor(f, name, counter, str(file))


def _token_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    tp: TPGroup = SINGLE,
    num_redundant_experts: int = 0,
) -> LoadedModel:
    """The checkpoint's model on `device`; with a tensor-parallel group, this rank's shard
    (parallel/tensor_parallel.py), its KV layout counting this rank's KV heads only."""
    start = time.perf_counter()
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no model config: {config_path} does not exist")
    hf = _read_json(config_path)
    architecture, model_cls = resolve_architecture(hf)
    if dtype == "auto":
        # transformers 5 writes `dtype`; older checkpoints `torch_dtype`.
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    torch_dtype = parse_dtype(dtype)
    files = _weight_files(model_dir)

    with torch.device("meta"):
        model = model_cls(hf)
        if tp.size > 1:
            model.tp_slices = shard_model(model, tp, num_redundant_experts)
    model = model.to(dtype=torch_dtype)
    for module in model.modules():  # e.g. routers that transformers also keeps in fp32
        for name in getattr(module, "fp32_parameters", ()):
            getattr(module, name).data = getattr(module, name).data.float()
    model = model.to_empty(device=device)
    bytes_read = [0]
    block = fp8_block_size(hf)
    converts = (
        type(model).convert_checkpoint_tensors is not DecoderForCausalLM.convert_checkpoint_tensors
    )
    if tp.size > 1 and block is None and not is_mxfp4(hf) and not converts:
        model.load_weights(_stream_lazy(files, bytes_read))
    else:
        # Quantized or re-laid-out tensors are converted whole (then sliced, under TP).
        tensors = _stream_tensors(files, bytes_read)
        if block is not None:
            tensors = dequantize_fp8_blocks(tensors, block, torch_dtype)
        elif is_mxfp4(hf):
            tensors = dequantize_mxfp4_experts(tensors, torch_dtype)
        model.load_weights(tensors)
    for module in model.modules():  # non-persistent buffers (rotary inv_freq) are not in files
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    model.eval().requires_grad_(False)

    generation_path = model_dir / "generation_config.json"
    generation = _read_json(generation_path) if generation_path.is_file() else {}
    # Multimodal configs (Llama 4) keep the text model's token ids in `text_config`.
    text = hf.get("text_config") if isinstance(hf.get("text_config"), dict) else {}
    eos: list[int] = []
    for value in (hf.get("eos_token_id"), text.get("eos_token_id"), generation.get("eos_token_id")):
        for token in _token_ids(value):
            if token not in eos:
                eos.append(token)
    bos = hf.get("bos_token_id", text.get("bos_token_id"))
    cfg = model.config
    kv_heads, kv_dim, kv_value_dim, kv_shared = cfg.kv_cache_layout
    kv_heads_total = kv_heads
    num_heads = cfg.num_heads
    if tp.size > 1:  # this rank's heads; MLA's latent cache is whole on every rank
        attention = model.model.layers[0].self_attn
        num_heads = attention.num_heads
        if not kv_shared:
            kv_heads = attention.num_kv_heads
    config = ModelConfig(
        architecture=architecture,
        model_type=hf.get("model_type", ""),
        num_layers=cfg.num_layers,
        num_attention_heads=num_heads,
        num_kv_heads=kv_heads,
        head_dim=kv_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_ids=eos,
        bos_token_id=bos if bos is not None else generation.get("bos_token_id"),
        dtype=torch_dtype,
        kv_value_dim=kv_value_dim,
        kv_shared=kv_shared,
        kv_heads_total=kv_heads_total,
    )
    seconds = time.perf_counter() - start
    log.info(
        "loaded %s from %s: %.2f GB in %.2f s (%.2f GB/s)",
        architecture,
        model_dir,
        bytes_read[0] / 1e9,
        seconds,
        bytes_read[0] / 1e9 / max(seconds, 1e-9),
    )
    return LoadedModel(model=model, config=config, load_seconds=seconds, bytes_read=bytes_read[0])


__all__ = [
    "DTYPES",
    "LoadedModel",
    "ModelConfig",
    "UnsupportedModelError",
    "load_model",
    "parse_dtype",
]
