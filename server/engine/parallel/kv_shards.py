"""Which KV heads a tensor-parallel rank caches, and converting K/V between one rank's heads
and the whole model's, for handing a prompt's K/V between engines (disaggregation).

A handoff always carries every KV head, as a one-rank engine caches them, so a prefill
replica and a decode replica need not have the same tensor-parallel size: the sender gathers
its ranks' heads, and each receiving rank keeps its own. MLA's latent cache, and attention
under DP attention, are whole on every rank already and need neither step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bisllm_server.engine.parallel.tensor_parallel import TPGroup, kv_head_range

HEADS_DIM = -2  # K/V data is [..., heads, head_dim]


def gather_kv_heads(data: torch.Tensor, tp: TPGroup, total: int) -> torch.Tensor:
    """Every rank's heads of `data` (this rank's, [..., local heads, D]) as all `total` heads,
    in order. A collective: every rank of the group calls it with the same shape."""
    parts = [torch.empty_like(data) for _ in range(tp.size)]
    dist.all_gather(parts, data.contiguous(), group=tp.group)
    if total >= tp.size:
        return torch.cat(parts, dim=HEADS_DIM)
    # Replicated heads: head h is cached by ranks h * size / total onwards; take the first.
    return torch.cat([parts[h * tp.size // total] for h in range(total)], dim=HEADS_DIM)


def local_kv_heads(data: torch.Tensor, tp: TPGroup, total: int) -> torch.Tensor:
    """This rank's heads of `data`, which holds all `total` heads."""
    first, count = kv_head_range(total, tp.size, tp.rank)
    return data.narrow(HEADS_DIM, first, count)
