"""Attention and experts backends that use the C++ CPU kernels where they win.

Both fall back to the PyTorch backends they extend for what the kernels do not cover: prefill
and mixed steps for attention, large batches (where batched matmuls beat the kernel's
per-expert loops) for the experts.
"""

from __future__ import annotations

import torch

from bisllm_server.engine.attention import TorchAttentionBackend
from bisllm_server.engine.forward_batch import ForwardBatch
from bisllm_server.engine.layers.mlp import silu_and_mul
from bisllm_server.engine.layers.moe import Activation, TorchExpertsBackend


class CpuAttentionBackend(TorchAttentionBackend):
    """Decode steps (one query per sequence) attend straight over the paged pool. The kernel
    needs separate, equally wide K and V buffers and plain causal attention; other pools
    (MLA's shared latent) and layers with a window, chunks or sinks keep the PyTorch path."""

    def __init__(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor]) -> None:
        super().__init__(k_buffers, v_buffers)
        self._decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._batch: ForwardBatch | None = None  # for the PyTorch metadata, built on demand
        self._kernel_fits = all(
            k.shape == v.shape and v.is_contiguous()
            for k, v in zip(k_buffers, v_buffers, strict=True)
        )

    def begin(self, batch: ForwardBatch) -> None:
        if self._kernel_fits and all(n == 1 for n in batch.query_lens):
            kv_lens = torch.tensor(batch.kv_lens, dtype=torch.int64)
            self._decode = (batch.out_slots, batch.kv_slots.contiguous(), kv_lens)
            self._batch = batch
            self.meta = None
        else:
            self._decode = None
            super().begin(batch)

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
        plain = sliding_window is None and chunk_size is None and sinks is None
        if self._decode is None or not plain:
            if self.meta is None:
                assert self._batch is not None, "begin(batch) must run before forward"
                super().begin(self._batch)
            return super().forward(
                layer_id,
                q,
                k,
                v,
                scale,
                sliding_window=sliding_window,
                chunk_size=chunk_size,
                sinks=sinks,
            )
        assert v is not None, "the kernel path only serves pools with V buffers of their own"
        out_slots, kv_slots, kv_lens = self._decode
        k_buf, v_buf = self.k_buffers[layer_id], self.v_buffers[layer_id]
        k_buf.index_copy_(0, out_slots, k.to(k_buf.dtype))
        v_buf.index_copy_(0, out_slots, v.to(v_buf.dtype))
        return torch.ops.bisllm_cpu.decode_attention(
            q.to(k_buf.dtype), k_buf, v_buf, kv_slots, kv_lens, scale
        ).to(q.dtype)


class CpuExpertsBackend(TorchExpertsBackend):
    """Batches of up to `max_pairs` (token, expert) pairs run in the fused kernel."""

    def __init__(self, max_pairs: int = 1024, **kwargs: float) -> None:
        super().__init__(**kwargs)
        self.max_pairs = max_pairs

    def prepare_weights(
        self, w13: torch.Tensor, w2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Each expert's matrix stored transposed: the kernel then streams weight rows against
        # register-resident accumulators, and the batched matmuls of the PyTorch paths read
        # `w.transpose(1, 2)` as a contiguous tensor.
        return _transposed_storage(w13), _transposed_storage(w2)

    def forward(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        *,
        b13: torch.Tensor | None = None,
        b2: torch.Tensor | None = None,
        activation: Activation = silu_and_mul,
    ) -> torch.Tensor:
        # The kernel computes bias-free silu(gate) * up experts only.
        plain = b13 is None and b2 is None and activation is silu_and_mul
        if (
            plain
            and 0 < topk_ids.numel() <= self.max_pairs
            and x.device.type == "cpu"
            and _is_transposed_storage(w13)
            and _is_transposed_storage(w2)
        ):
            return torch.ops.bisllm_cpu.fused_experts(
                x.contiguous(), topk_ids.contiguous(), topk_weights, w13, w2
            )
        return super().forward(
            x, topk_ids, topk_weights, w13, w2, b13=b13, b2=b2, activation=activation
        )


def _transposed_storage(w: torch.Tensor) -> torch.Tensor:
    """w [E, R, C] with the same values, each expert's matrix laid out column-major."""
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def _is_transposed_storage(w: torch.Tensor) -> bool:
    return w.dim() == 3 and w.transpose(1, 2).is_contiguous()
