"""What the engine asks of a draft model that runs on the target's hidden states (EAGLE, MTP).

Draft position p pairs the target's hidden state at p with the token at p + 1 and yields the
draft's own hidden state there, from which it predicts the token at p + 2. The draft keeps K/V
of its own (layers 0.. of a second pool that shares the target's pages), so a position's
draft K/V lives in the same slot as its target K/V and needs no bookkeeping of its own.

Chained drafting reuses the draft's output hidden state in place of the target's one it has
not got yet: the engine feeds back `forward`'s output for the next position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bisllm_server.engine.attention import AttentionBackend
from bisllm_server.engine.models.decoder import HiddenCapture


@dataclass(frozen=True)
class KVLayout:
    """Per token and layer of the draft's KV pool (see KVPool)."""

    num_kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    shared_kv: bool = False


class DraftModel(nn.Module):
    # Outputs of these target layers, side by side, are what the first draft step reads
    # (EAGLE-3); empty: the target's final hidden state after its last norm (EAGLE, MTP).
    aux_layers: tuple[int, ...] = ()
    num_kv_layers: int = 1
    kv_layout: KVLayout

    def target_features(self, capture: HiddenCapture) -> torch.Tensor:
        features = capture.aux if self.aux_layers else capture.final
        assert features is not None, "the target forward did not capture hidden states"
        return features

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """[T, hidden]: the draft's hidden states for tokens `input_ids` (those at p + 1) and
        `hidden` (the target's features at p, or the draft's own output at p - 1)."""
        raise NotImplementedError

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N] int64: the most likely target token after each row of `forward`'s output."""
        raise NotImplementedError
