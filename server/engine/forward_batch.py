"""What one model forward sees: a flat (packed) batch of new tokens plus paged-KV addressing."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Sequences are laid out contiguously in batch order; every tensor lives on the model device.

    A sequence contributes `query_lens[i]` new tokens whose positions are
    `kv_lens[i] - query_lens[i] ... kv_lens[i] - 1`; a decode step is the case query_len == 1.
    KV slots are flat indices `page * page_size + offset` into the per-layer KV buffers.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions
    out_slots: torch.Tensor  # [T] int64, KV slot that receives each new token's K/V
    query_lens: list[int]  # new tokens per sequence, sum == T
    kv_lens: list[int]  # context length per sequence after this step (cached + new)
    kv_slots: torch.Tensor  # [B, max(kv_lens)] int64 slot of each context position; padding 0
    logits_indices: torch.Tensor  # [N] int64 rows of the hidden states that need logits

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.query_lens)
