"""Attention over the paged KV cache.

An `AttentionBackend` sees every layer of one forward: `begin` turns the ForwardBatch into
per-step metadata once, then each layer's `forward` stores its new K/V at `out_slots` and
attends causally over each sequence's whole context (found through `kv_slots`). The PyTorch
backend here is the reference and the CPU path; GPU kernels implement the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bisllm_server.engine.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    @abstractmethod
    def begin(self, batch: ForwardBatch) -> None:
        """Build the step's metadata; every layer's `forward` until the next `begin` uses it."""

    @abstractmethod
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """q [T, H, D], k [T, KVH, D] and v [T, KVH, Dv] for the step's new tokens -> output
        [T, H, Dv]. v is None when the pool's V buffers are views of its K buffers (MLA's
        latent cache, see KVPool): storing K then stores V too."""


@dataclass
class _StepMeta:
    out_slots: torch.Tensor  # [T]
    flat_kv_slots: torch.Tensor  # [B * L]: index_select on it beats 2-D advanced indexing
    max_kv: int
    # [B, 1, Q, L] additive mask (0 = attend, -inf = masked) in the KV dtype, built once per step
    # (SDPA would otherwise convert a boolean mask in every layer); None if nothing is masked.
    mask: torch.Tensor | None
    num_seqs: int
    max_q: int
    # Row of each token in the padded [B * Q] query layout; None when all query_lens are equal
    # (then the packed tokens already are that layout and no copy is needed).
    pad_index: torch.Tensor | None


class TorchAttentionBackend(AttentionBackend):
    """Gather-then-SDPA: pads the step into [B, Q] queries against [B, L] gathered keys.

    All index tensors are built in `begin`, so a layer's forward is a fixed handful of tensor
    ops with no Python loop over sequences."""

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor]) -> None:
        self.k_buffers = k_buffers
        self.v_buffers = v_buffers
        self.meta: _StepMeta | None = None

    def begin(self, batch: ForwardBatch) -> None:
        device = batch.kv_slots.device
        num_seqs, max_q, max_kv = batch.num_seqs, max(batch.query_lens), batch.kv_slots.shape[1]
        pad_index = None
        if any(n != max_q for n in batch.query_lens):
            q_lens = torch.tensor(batch.query_lens, device=device)
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
            first_token = torch.cumsum(q_lens, 0) - q_lens
            offset = torch.arange(batch.num_tokens, device=device) - first_token[seq_of_token]
            pad_index = seq_of_token * max_q + offset

        mask = None
        if max_q > 1 or any(n != max_kv for n in batch.kv_lens):
            q_lens = torch.tensor(batch.query_lens, device=device)
            kv_lens = torch.tensor(batch.kv_lens, device=device)
            # Query row i of sequence b sits at position kv_len - q_len + i. Padding rows
            # (i >= q_len) land at or past kv_len and so see the sequence's whole valid
            # context: never an all-masked row, hence never a NaN, and their output is dropped.
            q_pos = (kv_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
            kv_pos = torch.arange(max_kv, device=device)
            causal = kv_pos[None, None, :] <= q_pos[:, :, None]
            valid = (kv_pos[None, :] < kv_lens[:, None])[:, None, :]
            visible = (causal & valid)[:, None]
            mask = torch.zeros(visible.shape, dtype=self.k_buffers[0].dtype, device=device)
            mask.masked_fill_(~visible, float("-inf"))
        self.meta = _StepMeta(
            batch.out_slots, batch.kv_slots.flatten(), max_kv, mask, num_seqs, max_q, pad_index
        )

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        m = self.meta
        assert m is not None, "begin(batch) must run before forward"
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        k_buf.index_copy_(0, m.out_slots, k.to(k_buf.dtype))
        if v is not None:
            v_buf.index_copy_(0, m.out_slots, v.to(v_buf.dtype))
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads, v_dim = k_buf.shape[1], v_buf.shape[2]
        # The CPU kernel runs single-query half-precision attention ~2x slower than fp32,
        # upcasts included; the gathered K/V are upcast while still contiguous (cheap).
        upcast = m.max_q == 1 and q.device.type == "cpu" and q.dtype != torch.float32
        compute_dtype = torch.float32 if upcast else q.dtype
        keys = k_buf.index_select(0, m.flat_kv_slots).to(compute_dtype)
        values = v_buf.index_select(0, m.flat_kv_slots).to(compute_dtype)
        keys = keys.view(m.num_seqs, m.max_kv, num_kv_heads, head_dim).transpose(1, 2)
        values = values.view(m.num_seqs, m.max_kv, num_kv_heads, v_dim).transpose(1, 2)

        if m.max_q == 1:
            # Decode: fold each KV head's query-head group into the query-row axis. The mask
            # ([B, 1, 1, L]) is the same for every row, and GQA needs no K/V expansion at all.
            queries = q.reshape(m.num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
            mask = m.mask
            if upcast:
                queries = queries.float()
                mask = None if mask is None else mask.float()
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
            return out.to(q.dtype).view(num_tokens, num_heads, v_dim)

        if m.pad_index is None:
            queries = q.reshape(m.num_seqs, m.max_q, num_heads, head_dim)
        else:
            queries = q.new_zeros(m.num_seqs * m.max_q, num_heads, head_dim)
            queries[m.pad_index] = q
            queries = queries.view(m.num_seqs, m.max_q, num_heads, head_dim)
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys,
            values,
            attn_mask=m.mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out = out.transpose(1, 2)  # [B, Q, H, D]
        if m.pad_index is None:
            return out.reshape(num_tokens, num_heads, v_dim)
        return out.reshape(m.num_seqs * m.max_q, num_heads, v_dim)[m.pad_index]
