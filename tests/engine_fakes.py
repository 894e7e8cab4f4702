"""A checksum model for scheduler tests: fast, exact, and sensitive to every KV slot it reads.

Each token's V row carries [id, id*position, position, 1]. A zero query attends uniformly over
the context, so the attention output times the context length gives sums over exactly the
tokens the page table points at. The next token is a hash of those sums: any page-table,
eviction or retraction bug that reads a wrong or stale slot changes the output.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bisllm_server.engine.forward_batch import ForwardBatch

EOS = 0


class ChecksumModel:
    def __init__(self, vocab_size: int = 64, eos_every: int = 0) -> None:
        self.vocab_size = vocab_size
        self.eos_every = eos_every  # > 0: some contexts map to EOS so requests end early
        self.forward_calls = 0

    def __call__(self, batch: ForwardBatch, attn) -> torch.Tensor:
        self.forward_calls += 1
        ids = batch.input_ids.to(torch.float64)
        pos = batch.positions.to(torch.float64)
        v = torch.stack([ids, ids * pos, pos, torch.ones_like(ids)], dim=-1)[:, None, :]
        q = torch.zeros_like(v)
        out = attn.forward(0, q, torch.zeros_like(v), v, 1.0)[batch.logits_indices, 0]
        n = batch.positions[batch.logits_indices].to(torch.float64) + 1
        sums = (out * n[:, None]).round().to(torch.int64)
        # Positions are read back too: their sum must be 0 + 1 + ... + (n - 1).
        expected = (n * (n - 1) / 2).to(torch.int64)
        assert torch.equal(sums[:, 2], expected), "KV slots returned wrong positions"
        token = (sums[:, 0] * 31 + sums[:, 1] * 7 + n.to(torch.int64)) % (self.vocab_size - 1) + 1
        if self.eos_every:
            token = torch.where(sums[:, 0] % self.eos_every == 0, EOS, token)
        logits = torch.full((len(token), self.vocab_size), -1e4, dtype=torch.float32)
        logits[torch.arange(len(token)), token] = 0.0
        return logits


def checksum_config(vocab_size: int = 64, max_len: int = 512) -> SimpleNamespace:
    return SimpleNamespace(
        num_layers=1,
        num_kv_heads=1,
        head_dim=4,
        vocab_size=vocab_size,
        max_position_embeddings=max_len,
        eos_token_ids=[EOS],
        dtype=torch.float64,
        kv_value_dim=None,
        kv_shared=False,
        kv_heads_total=1,
        kv_heads_sharded=False,
    )
