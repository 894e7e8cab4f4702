"""Attention over the paged KV cache.

An `AttentionBackend` sees every layer of one forward: `begin` turns the ForwardBatch into
per-step metadata once, then each layer's `forward` stores its new K/V at `out_slots` and
attends causally over each sequence's context (found through `kv_slots`). The PyTorch backend
here is the reference and the CPU path; GPU kernels implement the same interface.

Layers may narrow what a query sees, by absolute position p of the query and j of the key:
  sliding_window w - j > p - w: the query itself and the w - 1 tokens before it (GPT-OSS);
  chunk_size c     - j // c == p // c: only keys in the query's own block of c (Llama 4).
and may add attention sinks (GPT-OSS): one learned logit s_h per head that joins every softmax
row's denominator, exp(s_h) + sum_j exp(score_j), with nothing added to the output. The cache
keeps every token either way; only what the layer attends to changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

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
        *,
        sliding_window: int | None = None,
        chunk_size: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k [T, KVH, D] and v [T, KVH, Dv] for the step's new tokens -> output
        [T, H, Dv]. v is None when the pool's V buffers are views of its K buffers (MLA's
        latent cache, see KVPool): storing K then stores V too. `sliding_window`,
        `chunk_size` and `sinks` ([H]) are the optional per-layer restrictions above."""


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
    q_lens: torch.Tensor  # [B]
    kv_lens: torch.Tensor  # [B]
    # Additive masks of windowed / chunked layers, keyed by (sliding_window, chunk_size),
    # built by the first layer that needs one and shared by the others.
    local_masks: dict[tuple[int | None, int | None], torch.Tensor] = field(default_factory=dict)


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
        q_lens = torch.tensor(batch.query_lens, device=device)
        kv_lens = torch.tensor(batch.kv_lens, device=device)
        pad_index = None
        if any(n != max_q for n in batch.query_lens):
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens)
            first_token = torch.cumsum(q_lens, 0) - q_lens
            offset = torch.arange(batch.num_tokens, device=device) - first_token[seq_of_token]
            pad_index = seq_of_token * max_q + offset

        mask = None
        if max_q > 1 or any(n != max_kv for n in batch.kv_lens):
            mask = self._additive_mask(q_lens, kv_lens, max_q, max_kv, None, None)
        self.meta = _StepMeta(
            batch.out_slots,
            batch.kv_slots.flatten(),
            max_kv,
            mask,
            num_seqs,
            max_q,
            pad_index,
            q_lens,
            kv_lens,
        )

    def _additive_mask(
        self,
        q_lens: torch.Tensor,
        kv_lens: torch.Tensor,
        max_q: int,
        max_kv: int,
        sliding_window: int | None,
        chunk_size: int | None,
    ) -> torch.Tensor:
        """[B, 1, Q, L] additive mask (0 = attend, -inf = masked) in the KV dtype."""
        device = q_lens.device
        # Query row i of sequence b sits at position kv_len - q_len + i. Padding rows
        # (i >= q_len) land at or past kv_len and so see the sequence's whole valid context:
        # never an all-masked row, hence never a NaN, and their output is dropped.
        q_pos = (kv_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
        kv_pos = torch.arange(max_kv, device=device)
        visible = kv_pos[None, None, :] <= q_pos[:, :, None]
        visible &= (kv_pos[None, :] < kv_lens[:, None])[:, None, :]
        if sliding_window is not None or chunk_size is not None:
            # Padding rows are placed on the last real token, so they keep a visible key.
            local_q = torch.minimum(q_pos, (kv_lens - 1)[:, None])[:, :, None]
            if sliding_window is not None:
                visible &= kv_pos[None, None, :] > local_q - sliding_window
            if chunk_size is not None:
                visible &= (kv_pos // chunk_size)[None, None, :] == local_q // chunk_size
        mask = torch.zeros(visible[:, None].shape, dtype=self.k_buffers[0].dtype, device=device)
        return mask.masked_fill_(~visible[:, None], float("-inf"))

    def _layer_mask(
        self, sliding_window: int | None, chunk_size: int | None
    ) -> torch.Tensor | None:
        m = self.meta
        assert m is not None
        if sliding_window is None and chunk_size is None:
            return m.mask
        key = (sliding_window, chunk_size)
        if key not in m.local_masks:
            m.local_masks[key] = self._additive_mask(
                m.q_lens, m.kv_lens, m.max_q, m.max_kv, sliding_window, chunk_size
            )
        return m.local_masks[key]

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        scale: float,
        *,
        sliding_window: int | None = None,
        chunk_size: int | None = None,
        sinks: torch.Tensor | None = None,
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
        mask = self._layer_mask(sliding_window, chunk_size)
        if mask is not None:
            mask = mask.to(compute_dtype)

        if m.max_q == 1:
            # Decode: fold each KV head's query-head group into the query-row axis. The mask
            # ([B, 1, 1, L]) is the same for every row, and GQA needs no K/V expansion at all.
            queries = q.reshape(m.num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
            queries = queries.to(compute_dtype)
            if sinks is not None:
                keys, values, mask = _with_sink_column(
                    keys, values, mask, sinks.view(1, num_kv_heads, -1, 1), queries.shape
                )
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
            return out.to(q.dtype).view(num_tokens, num_heads, v_dim)

        if m.pad_index is None:
            queries = q.reshape(m.num_seqs, m.max_q, num_heads, head_dim)
        else:
            queries = q.new_zeros(m.num_seqs * m.max_q, num_heads, head_dim)
            queries[m.pad_index] = q
            queries = queries.view(m.num_seqs, m.max_q, num_heads, head_dim)
        queries = queries.transpose(1, 2)  # [B, H, Q, D]
        if sinks is not None:
            keys, values, mask = _with_sink_column(
                keys, values, mask, sinks.view(1, num_heads, 1, 1), queries.shape
            )
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out = out.transpose(1, 2)  # [B, Q, H, D]
        if m.pad_index is None:
            return out.reshape(num_tokens, num_heads, v_dim)
        return out.reshape(m.num_seqs * m.max_q, num_heads, v_dim)[m.pad_index]


def _with_sink_column(
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
    query_shape: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values and mask with one extra key column that every query row sees with the
    score s_h of its head: a zero key (its dot product is 0) whose additive mask entry is the
    sink, and a zero value, so softmax gains exp(s_h) in its denominator and nothing in its
    numerator. `sinks` broadcasts against [B, rows..., 1] of the queries' layout."""
    batch, heads, rows = query_shape[0], query_shape[1], query_shape[2]
    zero_key = keys.new_zeros(*keys.shape[:2], 1, keys.shape[3])
    zero_value = values.new_zeros(*values.shape[:2], 1, values.shape[3])
    sink_column = sinks.to(keys.dtype).expand(batch, heads, rows, 1)
    base = (
        keys.new_zeros(batch, heads, rows, keys.shape[2])
        if mask is None
        else mask.expand(batch, heads, rows, keys.shape[2])
    )
    return (
        torch.cat((keys, zero_key), dim=2),
        torch.cat((values, zero_value), dim=2),
        torch.cat((base, sink_column), dim=-1),
    )
