"""Turns a scheduled batch into a `ForwardBatch` and runs the model over the paged KV pool.

Page tables live in one tensor, a row per running request (mini-sglang's page_table), so the
slots of every context position are computed with a few tensor ops instead of Python loops.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bisllm_server.engine.attention import AttentionBackend
from bisllm_server.engine.forward_batch import ForwardBatch
from bisllm_server.engine.models.decoder import HiddenCapture
from bisllm_server.engine.request import Request
from bisllm_server.engine.scheduler import ScheduledBatch


class CausalModel(Protocol):
    def __call__(
        self, batch: ForwardBatch, attn: AttentionBackend, capture: HiddenCapture | None = None
    ) -> torch.Tensor: ...


class ModelRunner:
    def __init__(
        self,
        model: CausalModel,
        attn: AttentionBackend,
        *,
        page_size: int,
        max_rows: int,
        max_pages_per_seq: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.attn = attn
        self.page_size = page_size
        self.device = torch.device(device)
        self.page_table = torch.zeros(max_rows, max_pages_per_seq, dtype=torch.int64)
        self._arange = torch.arange(max_pages_per_seq * page_size, dtype=torch.int64)

    def sync_pages(self, req: Request) -> None:
        """Copy the request's pages allocated since the last sync into its page-table row."""
        if req.num_synced_pages < len(req.pages):
            start = req.num_synced_pages
            self.page_table[req.row, start : len(req.pages)] = torch.tensor(
                req.pages[start:], dtype=torch.int64
            )
            req.num_synced_pages = len(req.pages)

    def prepare(self, batch: ScheduledBatch) -> tuple[ForwardBatch, list[int], list[int]]:
        """Build the forward inputs; also returns the item indices whose logits are computed
        and, for each, how many logits rows it gets: 1, or 1 + its drafts for a request whose
        draft tokens are verified (a row per position, in order)."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        kv_lens: list[int] = []
        rows: list[int] = []
        sampled: list[int] = []
        spans: list[int] = []
        logits_rows: list[int] = []
        offset = 0
        for i, (req, n) in enumerate(batch.items):
            self.sync_pages(req)
            begin = req.num_computed
            input_ids.extend(req.token_ids[begin : begin + n])
            query_lens.append(n)
            kv_lens.append(begin + n)
            rows.append(req.row)
            offset += n
            if batch.samples(req, n):
                span = 1 + req.num_draft
                sampled.append(i)
                spans.append(span)
                logits_rows.extend(range(offset - span, offset))
        fb = self.make_batch(input_ids, query_lens, kv_lens, rows, logits_rows)
        return fb, sampled, spans

    def make_batch(
        self,
        input_ids: list[int],
        query_lens: list[int],
        kv_lens: list[int],
        rows: list[int],
        logits_rows: list[int],
    ) -> ForwardBatch:
        """A ForwardBatch for sequences in page-table `rows` whose last `query_lens[i]` of
        `kv_lens[i]` positions are the new tokens (packed in `input_ids`)."""
        ps = self.page_size
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        kv = torch.tensor(kv_lens, dtype=torch.int64)
        row_ids = torch.tensor(rows, dtype=torch.int64)
        num_tokens = len(input_ids)
        if num_tokens == len(query_lens):  # pure decode: one token per sequence
            positions = kv - 1
            token_rows = row_ids
        else:
            token_rows = torch.repeat_interleave(row_ids, q_lens)
            seq_starts = torch.cumsum(q_lens, 0) - q_lens
            within = torch.arange(num_tokens) - torch.repeat_interleave(seq_starts, q_lens)
            positions = torch.repeat_interleave(kv - q_lens, q_lens) + within
        out_slots = self.page_table[token_rows, positions // ps] * ps + positions % ps
        context = self._arange[: max(kv_lens)]
        tables = self.page_table[row_ids]
        kv_slots = tables[:, context // ps] * ps + context % ps

        device = self.device  # .to() is a no-op on CPU
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
            positions=positions.to(device, non_blocking=True),
            out_slots=out_slots.to(device, non_blocking=True),
            query_lens=query_lens,
            kv_lens=kv_lens,
            kv_slots=kv_slots.to(device, non_blocking=True),
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64).to(device),
        )

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, capture: HiddenCapture | None = None) -> torch.Tensor:
        """float32 logits [len(fb.logits_indices), vocab]; `capture` receives hidden states."""
        self.attn.begin(fb)
        if capture is None:
            return self.model(fb, self.attn)
        return self.model(fb, self.attn, capture)
