"""Tensor parallelism (Megatron-style) for the shared decoder, on torch.distributed.

Each rank of a TP group holds a slice of every large matrix:
- **Column-parallel** (output rows split): the fused qkv projection (this rank's attention
  heads), the dense and shared-expert gate/up projections, every expert's gate/up rows, and the
  LM head (its share of the vocabulary; the logits are gathered).
- **Vocab-parallel embedding**: each rank holds its share of the vocabulary's rows (the same
  share as the head's; a tied head is this very shard). A token embeds to zeros on the ranks
  that do not hold it, and an all-reduce adds the one that does.
- **Row-parallel** (input columns split): the attention output projection, the down
  projections and every expert's down columns. Each rank's output is a partial sum, so a
  decoder layer all-reduces once after attention and once after its MLP / MoE block. Biases
  of row-parallel layers live on rank 0 only, so they are added once.
- **Replicated**: norms, routers.
- **DP attention** (`dp_attention`): attention is not split; every rank serves its own
  requests with its own scheduler and KV cache. Before each MLP / MoE block the ranks' tokens
  are gathered (padded to the longest), the split block runs on all of them, the partial sums
  are all-reduced and each rank keeps its own rows. A rank with nothing to do still joins
  those collectives with zero tokens (`idle_forward`), so no rank waits forever.
- **Expert parallel** (`ep_size` > 1): the experts themselves are split over `ep_size` groups
  of ranks. Activations are the same on every rank of the group, so each rank runs its own
  experts on the tokens routed to them, and the layer's all-reduce combines the partial sums:
  the dispatch and combine of pure TP + EP need no all-to-all. Each expert's intermediate
  columns are still split over the `size / ep_size` ranks of its group.
- **All-to-all expert parallel** (`moe_all_to_all`: DP attention with `ep_size == size`): the
  tokens differ per rank and every rank holds whole experts, so no token needs to visit every
  rank. Each rank routes its own tokens and sends each (token, expert) pair's row to the rank
  holding the chosen replica (`all_to_all_single`), which runs it and sends the result back
  (DeepEP's "normal" dispatch / combine). Dense MLPs and shared experts are replicated whole
  (SGLang's moe_dense_tp_size = 1), so no layer gathers tokens or all-reduces.

KV heads are split like query heads when there are at least as many as ranks. With fewer
(GQA with 4 KV heads on 8 ranks), each rank keeps the one KV head its query heads read, so
each KV head is stored by tp/kv ranks. MLA (DeepSeek-V3, Kimi-K2) splits its heads, and its
latent KV cache, one latent per token, is kept whole on every rank (SGLang's DP attention is
the way to avoid that copy).

`shard_model` rewrites a model built on the meta device into this rank's shapes, before any
memory is allocated. It returns the `TPSlices` that tell the weight loader which part of each
checkpoint tensor this rank reads, so no rank needs a whole tensor (with safetensors' lazy
slices, not even read from disk).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bisllm_server.engine.parallel.state import all_gather, all_reduce


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks (a size does not divide)."""


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its tensor-parallel group; size 1 is the single-process engine."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup (None: the default group)
    # Expert parallel inside the group: ep_size groups of experts, each split over
    # size / ep_size ranks by intermediate columns (1: every rank has a slice of every expert).
    ep_size: int = 1
    # DP attention: every rank runs attention whole, on its own requests and KV cache; the
    # tokens of all ranks are gathered for the (split) MLP / MoE layers and scattered back,
    # or, with whole experts per rank, exchanged by all-to-all (`moe_all_to_all`).
    dp_attention: bool = False
    # The collectives this rank ran, by kind ("all_reduce", "gather_tokens", "all_to_all",
    # "all_gather"): which path the layers take, visible to tests and debugging.
    calls: Counter[str] = field(default_factory=Counter, compare=False, repr=False)

    @property
    def moe_all_to_all(self) -> bool:
        """Expert parallelism by all-to-all dispatch and combine (DeepEP's "normal" mode):
        DP attention with every rank holding whole experts (ep_size == size, so moe_tp_size
        is 1). Each rank routes its own tokens and sends each (token, expert) pair to the rank
        holding the chosen replica; dense MLPs and shared experts are replicated whole, so no
        layer gathers all tokens or all-reduces.

        The other combinations keep the all-reduce: without DP attention every rank already
        holds every token (the activations are identical), so there is nothing to dispatch,
        and a partial-sum all-reduce is the combine. With DP attention but ep_size < size each
        expert's columns are split over several ranks, which must all see the same tokens, so
        the tokens are gathered and the partial sums reduced."""
        return self.dp_attention and self.size > 1 and self.ep_size == self.size

    @property
    def moe_tp_size(self) -> int:
        return self.size // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank // self.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp_size

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal share of `total` items."""
        if total % self.size:
            raise TensorParallelError(
                f"{what} = {total} does not divide over tensor_parallel_size {self.size}"
            )
        length = total // self.size
        return self.rank * length, length

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self.calls["all_reduce"] += 1
        return all_reduce(x, self.group, self.size)

    def all_to_all(
        self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]
    ) -> torch.Tensor:
        """Send the first send_splits[0] rows of `x` to rank 0, the next send_splits[1] to
        rank 1, ...; returns the rows received, recv_splits[r] from rank r, in rank order.
        Every rank of the group must call it, an idle one with zero splits."""
        self.calls["all_to_all"] += 1
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=self.group)
        return out

    def gather_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Every rank's rows of `x` ([T_rank, H], T differing by rank, 0 for an idle rank),
        in rank order, and where this rank's rows start in them and how many there are."""
        self.calls["gather_tokens"] += 1
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([x.shape[0]]), group=self.group)
        sizes = [int(c) for c in counts]
        longest = max(sizes)
        padded = x.new_zeros(longest, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        rows = torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])
        return rows, sum(sizes[: self.rank]), x.shape[0]

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size > 1:
            self.calls["all_gather"] += 1
        return all_gather(x, self.group, self.size, dim)


SINGLE = TPGroup()


def engine_group(state: Any) -> TPGroup:
    """The engine's group for a rank of a `state.ParallelState` (the launcher's): its TP group,
    with the config's expert parallelism, and DP attention when attention runs one rank per
    DP group (attention split inside DP groups, 1 < dp < tp, is not built yet)."""
    config = state.config
    dp = config.attention_dp_size
    if 1 < dp < config.tp_size:
        raise TensorParallelError(
            f"attention_dp_size {dp} with tensor_parallel_size {config.tp_size}: DP attention "
            "runs either one rank per DP group (attention_dp_size = tensor_parallel_size) or "
            "not at all"
        )
    return TPGroup(
        state.layout.tp_rank,
        config.tp_size,
        state.tp_group,
        ep_size=config.ep_size,
        dp_attention=dp > 1,
    )


class ExpertSlots:
    """The physical expert slots one rank holds in one MoE layer (see eplb.py for the
    layout): slots first .. first + count - 1, holding logical experts `phy2log`; each
    expert's intermediate columns `columns` (start, length). `sources` remembers where each
    expert's tensors are in the checkpoint, so a rebalance can read an expert it did not
    hold: (logical expert, projection) -> (file, tensor name)."""

    def __init__(self, index: int, first: int, count: int, phy2log: list[int]) -> None:
        self.index = index  # this layer's position among the model's MoE layers
        self.first, self.count = first, count
        self.phy2log = phy2log
        self.columns: tuple[int, int] = (0, 0)
        self.sources: dict[tuple[int, str], tuple[str, str]] = {}


@dataclass
class TPSlices:
    """Per (parameter name, shard label): the (dim, start, length) of the checkpoint tensor
    this rank reads; `skip`: checkpoint-side parameter names this rank does not hold (the
    row-parallel biases of ranks other than 0)."""

    slices: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    skip: set[str] = field(default_factory=set)
    # Expert parallel: experts module name -> the physical slots this rank holds.
    experts: dict[str, ExpertSlots] = field(default_factory=dict)

    def local_names(self, name: str) -> list[str]:
        """Where a checkpoint parameter goes on this rank: the name itself, or for one
        expert's tensor every local slot holding that expert (none: other ranks hold it)."""
        head, sep, tail = name.partition(".experts.")
        slots = self.experts.get(f"{head}.experts") if sep else None
        index, _, rest = tail.partition(".")
        if slots is None or not index.isdigit():
            return [name]  # not expert-parallel, or fused per-layer tensors
        return [
            f"{head}.experts.{j}.{rest}"
            for j, expert in enumerate(slots.phy2log)
            if expert == int(index)
        ]

    def note_source(self, name: str, ckpt_name: str, source: Any) -> None:
        """Remember where an expert's tensor is in the checkpoint (a lazily read one)."""
        head, sep, tail = name.partition(".experts.")
        slots = self.experts.get(f"{head}.experts") if sep else None
        index, _, rest = tail.partition(".")
        path = getattr(source, "path", None)
        if slots is not None and index.isdigit() and path is not None:
            slots.sources[(int(index), rest.split(".")[0])] = (path, ckpt_name)

    def add(self, pname: str, shard: str, dim: int, start: int, length: int) -> None:
        self.slices[(pname, shard)] = (dim, start, length)


def shard_model(model: nn.Module, tp: TPGroup, num_redundant_experts: int = 0) -> TPSlices:
    """Rewrite `model` (a DecoderForCausalLM on the meta device) into this rank's shard.
    Under expert parallelism each MoE layer has num_experts + `num_redundant_experts`
    physical slots, first laid out trivially (slot i holds expert i % num_experts). Under
    all-to-all expert parallelism (`TPGroup.moe_all_to_all`) the dense MLPs and shared experts
    are left whole, and the experts exchange tokens through the group."""
    from bisllm_server.engine.layers.mlp import SwiGLUMLP
    from bisllm_server.engine.layers.moe import FusedExperts
    from bisllm_server.engine.models.decoder import Attention, DecoderLayer
    from bisllm_server.engine.models.mla import MlaAttention

    out = TPSlices()
    if tp.size == 1:
        return out
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, MlaAttention):
            if not tp.dp_attention:  # under DP attention each rank runs attention whole
                _shard_mla(module, prefix, tp, out)
        elif isinstance(module, Attention):
            if not tp.dp_attention:
                _shard_attention(module, prefix, tp, out)
        elif isinstance(module, SwiGLUMLP):
            # All-to-all EP: dense MLPs and shared experts stay whole (and are read whole),
            # so they run on this rank's own tokens with no collective.
            if not tp.moe_all_to_all:
                _shard_mlp(module, prefix, tp, out)
        elif isinstance(module, FusedExperts):
            _shard_experts(module, prefix, tp, out, num_redundant_experts)
        elif isinstance(module, DecoderLayer):
            module.tp = tp  # all-reduces its attention and MLP outputs
    # Under DP attention each rank embeds and scores its own tokens: embedding and head stay
    # whole. Otherwise both hold this rank's share of the vocabulary (a tied head is the
    # embedding shard), and the logits are gathered.
    if not tp.dp_attention:
        embed = model.model.embed_tokens
        start, length = tp.split(embed.num_embeddings, "vocab_size")
        model.model.embed_tokens = VocabParallelEmbedding(start, length, embed.embedding_dim, tp)
        out.add("model.embed_tokens.weight", "all", 0, start, length)
        head = getattr(model, "lm_head", None)
        if head is not None:
            model.lm_head = nn.Linear(head.in_features, length, bias=False)
            out.add("lm_head.weight", "all", 0, start, length)
    model.tp = tp  # gathers the vocabulary shards of the logits
    return out


class VocabParallelEmbedding(nn.Module):
    """Rows start .. start + length - 1 of the embedding matrix. A token outside them embeds
    to zeros here, and the all-reduce adds the rank that holds it: one all-reduce of [T,
    hidden] instead of every rank holding vocab x hidden."""

    def __init__(self, start: int, length: int, hidden: int, tp: TPGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(length, hidden))
        self.start = start
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        here = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(torch.where(here, local, 0), self.weight)
        return self.tp.all_reduce(x * here.unsqueeze(-1).to(x.dtype))


def _row_parallel(
    linear: nn.Linear, in_start: int, in_len: int, pname: str, tp: TPGroup, out: TPSlices
) -> nn.Linear:
    bias = linear.bias is not None and tp.rank == 0
    if linear.bias is not None and not bias:
        out.skip.add(f"{pname}.bias")
    out.add(f"{pname}.weight", "all", 1, in_start, in_len)
    return nn.Linear(in_len, linear.out_features, bias=bias)


def kv_head_range(total: int, size: int, rank: int) -> tuple[int, int]:
    """(first, count) of the KV heads rank `rank` of `size` caches, out of `total`: an equal
    share when there are at least as many heads as ranks, else the one head its query heads
    read (each head then cached by size / total ranks)."""
    if total >= size:
        if total % size:
            raise TensorParallelError(
                f"num_key_value_heads = {total} does not divide over tensor_parallel_size {size}"
            )
        return rank * (total // size), total // size
    if size % total:
        raise TensorParallelError(
            f"num_key_value_heads = {total} neither divides over nor into "
            f"tensor_parallel_size {size}"
        )
    return rank * total // size, 1


def _shard_attention(attn: Any, prefix: str, tp: TPGroup, out: TPSlices) -> None:
    d = attn.head_dim
    q_start, q_heads = tp.split(attn.num_heads, "num_attention_heads")
    kv_start, kv_heads = kv_head_range(attn.num_kv_heads, tp.size, tp.rank)
    qkv = attn.qkv_proj
    attn.qkv_proj = nn.Linear(
        qkv.in_features, (q_heads + 2 * kv_heads) * d, bias=qkv.bias is not None
    )
    for part in ("weight", "bias") if qkv.bias is not None else ("weight",):
        pname = f"{prefix}qkv_proj.{part}"
        out.add(pname, "q_proj", 0, q_start * d, q_heads * d)
        out.add(pname, "k_proj", 0, kv_start * d, kv_heads * d)
        out.add(pname, "v_proj", 0, kv_start * d, kv_heads * d)
    attn.o_proj = _row_parallel(attn.o_proj, q_start * d, q_heads * d, f"{prefix}o_proj", tp, out)
    if attn.sinks is not None:
        attn.sinks = nn.Parameter(torch.empty(q_heads))
        out.add(f"{prefix}sinks", "all", 0, q_start, q_heads)
    attn.num_heads, attn.num_kv_heads = q_heads, kv_heads
    attn.q_size, attn.kv_size = q_heads * d, kv_heads * d


def _shard_mla(mla: Any, prefix: str, tp: TPGroup, out: TPSlices) -> None:
    """Heads split; the latent projections (and so the latent KV cache) are replicated: the
    cache holds one latent per token whatever the head count, so every rank keeps it whole."""
    start, heads = tp.split(mla.num_heads, "num_attention_heads")
    qk = mla.nope_dim + mla.rope_dim
    if mla.q_proj is not None:
        mla.q_proj = nn.Linear(mla.q_proj.in_features, heads * qk, bias=False)
        out.add(f"{prefix}q_proj.weight", "all", 0, start * qk, heads * qk)
    else:
        mla.q_b_proj = nn.Linear(mla.q_b_proj.in_features, heads * qk, bias=False)
        out.add(f"{prefix}q_b_proj.weight", "all", 0, start * qk, heads * qk)
    per_head = mla.nope_dim + mla.v_head_dim
    mla.kv_b_proj = nn.Linear(mla.kv_lora_rank, heads * per_head, bias=False)
    out.add(f"{prefix}kv_b_proj.weight", "all", 0, start * per_head, heads * per_head)
    v = mla.v_head_dim
    mla.o_proj = _row_parallel(mla.o_proj, start * v, heads * v, f"{prefix}o_proj", tp, out)
    mla.num_heads = heads


def _shard_mlp(mlp: Any, prefix: str, tp: TPGroup, out: TPSlices) -> None:
    gate_up = mlp.gate_up_proj
    start, length = tp.split(gate_up.out_features // 2, "intermediate_size")
    mlp.gate_up_proj = nn.Linear(gate_up.in_features, 2 * length, bias=gate_up.bias is not None)
    for part in ("weight", "bias") if gate_up.bias is not None else ("weight",):
        for shard in ("gate_proj", "up_proj"):
            out.add(f"{prefix}gate_up_proj.{part}", shard, 0, start, length)
    mlp.down_proj = _row_parallel(mlp.down_proj, start, length, f"{prefix}down_proj", tp, out)


def _shard_experts(
    experts: Any, prefix: str, tp: TPGroup, out: TPSlices, num_redundant: int
) -> None:
    """Expert slots split over the EP groups, each expert's intermediate columns over the
    ranks of an EP group."""
    from bisllm_server.engine.parallel.eplb import ExpertPlacement

    num_experts, rows, hidden = experts.w13.shape
    if tp.size % tp.ep_size:
        raise TensorParallelError(
            f"expert_parallel_size {tp.ep_size} does not divide tensor_parallel_size {tp.size}"
        )
    if experts.b13 is not None:
        raise TensorParallelError(
            "tensor parallelism does not split experts with biases yet (GPT-OSS); use "
            "tensor_parallel_size 1 for this model"
        )
    moe_tp = TPGroup(tp.moe_tp_rank, tp.moe_tp_size)
    start, length = moe_tp.split(rows // 2, "moe_intermediate_size")
    count = num_experts
    if tp.ep_size > 1:
        ep = TPGroup(tp.ep_rank, tp.ep_size)
        first, count = ep.split(num_experts + num_redundant, "num_experts + redundant slots")
        with torch.device("cpu"):  # tables, not parameters: real even on a meta model
            placement = ExpertPlacement.trivial(1, num_experts, tp.ep_size, num_redundant)
        index = len(out.experts)
        slots = ExpertSlots(
            index, first, count, placement.phy2log[0, first : first + count].tolist()
        )
        slots.columns = (start, length)
        out.experts[prefix.removesuffix(".")] = slots
        experts.set_placement(index, placement.log2phy[0], placement.logcnt[0], first, count)
        if tp.moe_all_to_all:
            experts.dispatch_group = tp  # tokens go to their experts' ranks and back
    experts.w13 = nn.Parameter(torch.empty(count, 2 * length, hidden))
    experts.w2 = nn.Parameter(torch.empty(count, hidden, length))
    if moe_tp.size > 1:
        for e in range(count):
            # A per-expert checkpoint tensor: gate/up [I, H] (rows split), down [H, I]
            # (columns).
            out.add(f"{prefix}w13", f"{e}.gate_proj", 0, start, length)
            out.add(f"{prefix}w13", f"{e}.up_proj", 0, start, length)
            out.add(f"{prefix}w2", f"{e}.down_proj", 1, start, length)
