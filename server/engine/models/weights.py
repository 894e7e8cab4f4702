"""Map HF checkpoint tensors onto the fused parameters of the shared decoder.

Every tensor is copied straight into its final place (a parameter or a slice of one), so
loading never holds a second copy of the model. Names handled beyond exact matches:
  self_attn.{q,k,v}_proj.*                  -> rows of self_attn.qkv_proj.*
  *.{gate,up}_proj.*  (dense / shared MLPs) -> rows of *.gate_up_proj.*
  mlp.experts.E.{gate,up,down}_proj.weight  -> w13[E] gate rows / up rows, w2[E]
  mlp.experts.{gate_up_proj,down_proj}      -> w13 / w2 whole (transformers' fused in-memory
                                               names, saved when save_original_format is off)
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bisllm_server.engine.parallel.tensor_parallel import TPSlices

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
_QKV = re.compile(r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj)\.(weight|bias)$")
_GATE_UP = re.compile(r"^(.*)\.(gate_proj|up_proj)\.(weight|bias)$")
# Tensors some checkpoints carry that this engine recomputes instead of loading.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors do not match the model's parameters (unknown, missing or misshapen)."""


class WeightMapper:
    """Resolves a checkpoint name to (parameter name, shard label, destination view)."""

    def __init__(self, model: nn.Module, q_size: int, kv_size: int) -> None:
        self.params = dict(model.named_parameters())
        self.qkv_rows = {"q_proj": (0, q_size), "k_proj": (q_size, kv_size)}
        self.qkv_rows["v_proj"] = (q_size + kv_size, kv_size)

    def resolve(self, name: str) -> tuple[str, str, torch.Tensor] | None:
        if name in self.params:
            return name, "all", self.params[name].data
        if m := _EXPERT.match(name):
            prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
            if proj == "down_proj":
                return self._slice(f"{prefix}.w2", f"{expert}.{proj}", expert)
            w13 = self.params.get(f"{prefix}.w13")
            half = 0 if w13 is None else w13.shape[1] // 2
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
            return self._slice(f"{prefix}.w13", f"{expert}.{proj}", (expert, rows))
        if m := _FUSED_EXPERTS.match(name):
            suffix = "w13" if m.group(2) == "gate_up_proj" else "w2"
            return self._slice(f"{m.group(1)}.{suffix}", "all", slice(None))
        if m := _QKV.match(name):
            start, size = self.qkv_rows[m.group(2)]
            pname = f"{m.group(1)}.qkv_proj.{m.group(3)}"
            return self._slice(pname, m.group(2), slice(start, start + size))
        if m := _GATE_UP.match(name):
            pname = f"{m.group(1)}.gate_up_proj.{m.group(3)}"
            half = self.params[pname].shape[0] // 2 if pname in self.params else 0
            rows = slice(0, half) if m.group(2) == "gate_proj" else slice(half, 2 * half)
            return self._slice(pname, m.group(2), rows)
        return None

    def shards(self, pname: str) -> set[str]:
        """The shard labels that together fill `pname` (besides a single "all")."""
        module = pname.rsplit(".", 2)[-2] if pname.count(".") >= 2 else ""
        if pname.endswith((".w13", ".w2")):
            projs = ("gate_proj", "up_proj") if pname.endswith(".w13") else ("down_proj",)
            return {f"{e}.{p}" for e in range(self.params[pname].shape[0]) for p in projs}
        if module == "qkv_proj":
            return set(self.qkv_rows)
        if module == "gate_up_proj":
            return {"gate_proj", "up_proj"}
        return {"all"}

    def _slice(
        self, pname: str, shard: str, index: int | slice | tuple[int, slice]
    ) -> tuple[str, str, torch.Tensor] | None:
        param = self.params.get(pname)
        return None if param is None else (pname, shard, param.data[index])


def load_checkpoint_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor | LazyTensor]],
    mapper: WeightMapper,
    renames: Iterable[tuple[str, str]] = (),
    skip: Iterable[str] = (),
    optional_prefix: str | None = None,
    tp: TPSlices | None = None,
) -> bool:
    """Copy every (name, tensor) into place; raise CheckpointMismatchError on an unknown or
    misshapen tensor, and after the last one if any parameter was not (fully) written.

    Parameters under `optional_prefix` (e.g. the MTP layers) may be absent as a group: then
    they count as missing only if some of them were written. Returns whether any was.

    Tensor parallel: `tp` says which part of a tensor this rank reads (a lazy tensor reads
    only that part from the file) and which tensors belong to other ranks only."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in renames]
    skip = set(skip)
    loaded: dict[str, set[str]] = defaultdict(set)  # parameter -> shard labels written
    for ckpt_name, source in weights:
        if ckpt_name in skip or _IGNORED.search(ckpt_name):
            continue
        name = ckpt_name
        for pattern, repl in compiled:
            name = pattern.sub(repl, name)
        names = [name]
        if tp is not None:
            tp.note_source(name, ckpt_name, source)
            # Another rank's expert or bias: nothing here; an expert in several local slots:
            # each of them.
            names = [n for n in tp.local_names(name) if n not in tp.skip]
        for local in names:
            _load_one(model, mapper, tp, ckpt_name, local, source, loaded)
    optional_loaded = optional_prefix is not None and any(
        pname.startswith(optional_prefix) for pname in loaded
    )
    missing = []
    for pname in mapper.params:
        if optional_prefix and pname.startswith(optional_prefix) and not optional_loaded:
            continue
        got = loaded[pname]
        if "all" in got:
            continue
        absent = sorted(mapper.shards(pname) - got, key=_natural)
        if absent:
            shown = ", ".join(absent[:8]) + (", …" if len(absent) > 8 else "")
            missing.append(pname if not got else f"{pname} (missing {shown})")
    if missing:
        more = f" … and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise CheckpointMismatchError(
            f"checkpoint is missing weights for {len(missing)} parameter(s): {', '.join(missing[:20])}{more}"
        )
    return optional_loaded


def _load_one(
    model: nn.Module,
    mapper: WeightMapper,
    tp: TPSlices | None,
    ckpt_name: str,
    name: str,
    source: torch.Tensor | LazyTensor,
    loaded: dict[str, set[str]],
) -> None:
    """Copy one checkpoint tensor (or this rank's slice of it) into the parameter `name`."""
    target = mapper.resolve(name)
    if target is None:
        raise CheckpointMismatchError(
            f"checkpoint tensor {ckpt_name!r} does not match any parameter of {type(model).__name__}"
        )
    pname, shard, dest = target
    part = tp.slices.get((pname, shard)) if tp is not None else None
    if part is not None:
        dim, start, length = part
        if start + length > source.shape[dim]:
            raise CheckpointMismatchError(
                f"checkpoint tensor {ckpt_name!r} has shape {tuple(source.shape)}: too small "
                f"for this rank's slice {start}:{start + length} of dim {dim}"
            )
        tensor = source.narrow(dim, start, length)
    else:
        tensor = source.materialize() if isinstance(source, LazyTensor) else source
    if dest.shape != tensor.shape:
        raise CheckpointMismatchError(
            f"checkpoint tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, but {pname} ({shard}) expects {tuple(dest.shape)}"
        )
    with torch.no_grad():
        dest.copy_(tensor)
    loaded[pname].add(shard)


class LazyTensor:
    """A checkpoint tensor not read yet: a safetensors slice that reads only the part asked
    for (`narrow`), or all of it (`materialize`). Valid while its file is open."""

    def __init__(
        self, handle: Any, name: str, counter: list[int] | None = None, path: str | None = None
    ) -> None:
        self._slice = handle.get_slice(name)
        self._handle, self._name, self._counter = handle, name, counter
        self.path = path  # the file, for reading the tensor again later (EPLB)
        self.shape = torch.Size(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._count(self._slice[tuple(index)])

    def materialize(self) -> torch.Tensor:
        return self._count(self._handle.get_tensor(self._name))

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._counter is not None:
            self._counter[0] += tensor.nbytes
        return tensor


def _natural(label: str) -> tuple[int, str]:
    head, _, tail = label.partition(".")
    return (int(head), tail) if head.isdigit() else (-1, label)
