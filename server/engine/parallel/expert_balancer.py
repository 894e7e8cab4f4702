"""Live expert-parallel load balancing: count what the router sends each expert, and every
`interval` forward passes move the expert slots to even out the ranks (eplb.py).

Every rank of the group sees the same routing, because activations are the same on every rank,
so every rank records the same counts. Each rank therefore computes the same new placement on
its own, with no messages. Under all-to-all expert parallelism (`TPGroup.moe_all_to_all`: DP
attention, each rank routing only its own tokens) the ranks' counts differ, so the window's
counts are summed over the group first (one small all-reduce per rebalance, which every rank
joins, idle or not); from the same sum every rank again computes the same placement.

A rank then reads, from the checkpoint, the experts that its slots newly hold (only its
intermediate columns) and swaps in the new dispatch tables. This happens between two engine
steps, so no request is dropped or paused for more than that step. The outputs do not change,
because an expert computes the same function whichever slot holds it.
"""

from __future__ import annotations

import logging

import torch
from safetensors import safe_open
from torch import nn

from bisllm_server.engine.layers.moe import FusedExperts
from bisllm_server.engine.parallel.eplb import ExpertLoadRecorder, ExpertPlacement, rebalance
from bisllm_server.engine.parallel.tensor_parallel import ExpertSlots, TPGroup, TPSlices

log = logging.getLogger("bisllm.engine")


class ExpertBalancer:
    def __init__(self, model: nn.Module, slices: TPSlices, tp: TPGroup, *, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"eplb_rebalance_interval must be >= 1, got {interval}")
        layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedExperts)}
        self.layers = sorted(
            ((slices.experts[name], module) for name, module in layers.items()),
            key=lambda pair: pair[0].index,
        )
        if not self.layers:
            raise ValueError("expert load balancing needs an expert-parallel MoE model")
        missing = [s.index for s, _ in self.layers if not s.sources]
        if missing:
            raise ValueError(
                "expert load balancing re-reads experts from the checkpoint, but its expert "
                "tensors were converted on load (quantized or re-laid-out checkpoints)"
            )
        first = self.layers[0][1]
        assert first.log2phy is not None
        self.num_logical = first.log2phy.shape[0]
        self.num_physical = self.num_logical + first.log2phy.shape[1] - 1
        self.tp = tp
        self.interval = interval
        self.recorder = ExpertLoadRecorder(len(self.layers), self.num_logical, window=interval)
        for _, module in self.layers:
            module.recorder = self.recorder
        self.placement = ExpertPlacement.trivial(
            len(self.layers), self.num_logical, tp.ep_size, self.num_physical - self.num_logical
        )
        self.passes = 0
        # The busiest rank's routed tokens / the mean rank's, worst layer, under the placement
        # that served the last window (1.0: even; also before the first window closes).
        self.imbalance = 1.0
        self.rebalances = 0
        self.experts_moved = 0  # slots on this rank that received another expert

    def after_forward(self) -> None:
        """One forward pass is over: close its counts; rebalance every `interval` passes."""
        self.recorder.step()
        self.passes += 1
        if self.passes % self.interval == 0:
            self.rebalance()

    def rebalance(self) -> None:
        load = self.recorder.load()
        if self.tp.moe_all_to_all:
            # This rank counted only its own tokens: sum every rank's window (before the
            # early return below, so all ranks join), then all balance the same load.
            device = self.layers[0][1].w13.device  # NCCL reduces on the GPU, gloo on the CPU
            load = self.tp.all_reduce(load.to(device).contiguous()).cpu()
        if not load.any():
            return
        # Measured here, once per window, not every step: summing the window's counts costs
        # layers x experts x interval, too much for the engine step.
        self.imbalance = float(self.placement.imbalance(load).max())
        new = rebalance(
            load,
            num_physical=self.num_physical,
            num_groups=1,
            num_nodes=1,
            num_ranks=self.tp.ep_size,
        )
        for layer, (slots, module) in enumerate(self.layers):
            row = new.phy2log[layer, slots.first : slots.first + slots.count].tolist()
            for j, expert in enumerate(row):
                if expert != slots.phy2log[j]:
                    self._load_slot(slots, module, j, expert)
            slots.phy2log = row
            module.set_placement(
                slots.index, new.log2phy[layer], new.logcnt[layer], slots.first, slots.count
            )
        self.placement = new
        self.rebalances += 1
        log.info(
            "EPLB rebalance %d: expert load imbalance %.3f -> %.3f",
            self.rebalances,
            self.imbalance,
            float(new.imbalance(load).max()),
        )

    @torch.no_grad()
    def _load_slot(self, slots: ExpertSlots, module: FusedExperts, slot: int, expert: int) -> None:
        """Read `expert`'s gate, up and down (this rank's columns) into local `slot`."""
        start, length = slots.columns
        for proj in ("gate_proj", "up_proj", "down_proj"):
            path, name = slots.sources[(expert, proj)]
            with safe_open(path, framework="pt", device="cpu") as f:
                part = f.get_slice(name)
                if proj == "down_proj":  # [H, I]: this rank's intermediate columns
                    module.w2.data[slot].copy_(part[:, start : start + length])
                else:  # [I, H]: this rank's intermediate rows, gate then up
                    offset = 0 if proj == "gate_proj" else length
                    module.w13.data[slot, offset : offset + length].copy_(
                        part[start : start + length]
                    )
        self.experts_moved += 1
