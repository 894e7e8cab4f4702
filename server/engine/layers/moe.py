"""Sparse mixture-of-experts block: a router plus fused SwiGLU experts.

Experts are stored fused, as transformers 5 keeps them in memory: `w13` [E, 2*I, H] (gate rows,
then up rows) and `w2` [E, H, I], with optional biases `b13` [E, 2*I] and `b2` [E, H] and
another gated activation than silu(gate) * up (GPT-OSS). The expert computation sits behind
`ExpertsBackend` so a fused GPU kernel can replace the PyTorch grouping without touching the
models.

Routers (`router=`): "softmax" (softmax over all experts, then top-k: Qwen3-MoE, Mixtral),
"topk_softmax" (top-k logits, then softmax over those k: GPT-OSS), "sigmoid_grouped"
(DeepSeek-V3 / GLM-4.5, GroupedTopkRouter) and "sigmoid_topk_input" (Llama 4: sigmoid of the
top-k logits, which scales each expert's input instead of its output).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bisllm_server.engine.layers.mlp import SwiGLUMLP, silu_and_mul


def softmax_topk(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, fp32_weights: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] in the logits' dtype, or fp32 with `fp32_weights`; topk_ids [T, k]
    int64).

    Softmax over all experts in fp32, then top-k, renormalised to sum to one when the family
    says so (Qwen3-MoE: `norm_topk_prob`; Mixtral: always)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if fp32_weights else weights.to(router_logits.dtype)), ids


def topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: the top-k logits, softmaxed among themselves in the logits' dtype."""
    values, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(values, dim=-1, dtype=values.dtype), ids


def sigmoid_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4: sigmoid (in fp32, rounded to the logits' dtype) of the top-k raw logits."""
    values, ids = torch.topk(router_logits, top_k, dim=-1)
    return values.float().sigmoid().to(values.dtype), ids


# An expert's activation: [..., gate | up] (2 * I wide) -> [..., I].
Activation = Callable[[torch.Tensor], torch.Tensor]


class ExpertsBackend(ABC):
    """Computes sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for every token t,
    where expert_e(x) = act(x @ w13[e].T + b13[e]) @ w2[e].T + b2[e] (no biases: b13 and b2
    None; act: silu_and_mul unless given)."""

    def prepare_weights(
        self, w13: torch.Tensor, w2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert weights in the memory layout this backend reads fastest: same shapes and
        values, possibly other strides. Called once per layer when the backend is installed."""
        return w13, w2

    @abstractmethod
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
    ) -> torch.Tensor: ...


class TorchExpertsBackend(ExpertsBackend):
    """Experts in plain PyTorch, as a handful of large ops (never a loop over tokens).

    On CPU and at small batch the per-op overhead, not the arithmetic, sets the time, so the
    strategy with the fewest ops is used whose extra compute stays within `max_waste` times
    the routed work:
      gathered - with fewer (token, slot) pairs than half the experts (decode at small batch
                with many experts), the picked experts' weights are gathered and each pair
                runs as one row of a batched matmul: no padding, no idle experts;
      dense   - every expert runs on every token and the routing weights zero the unpicked
                results (E <= max_waste * k, e.g. Mixtral's 8 experts / top-2), for batches
                of up to `dense_max_tokens` tokens (decode-sized; bounds the memory);
      padded  - each (token, slot) pair takes the next free row of its expert's group, and
                every group is padded to the largest one, so all experts run as one batched
                matmul pair; each token then sums its k rows;
      grouped - one matmul pair per expert that received tokens (heavily skewed routing).
    """

    def __init__(
        self, max_waste: float = 4.0, dense_max_tokens: int = 256, one_hot_max: int = 1 << 16
    ) -> None:
        self.max_waste = max_waste
        self.dense_max_tokens = dense_max_tokens
        # Up to this many (pair, expert) cells, each pair's rank within its expert comes from a
        # cumulative one-hot count (a few cheap ops); beyond it, from a sort (bounded memory).
        self.one_hot_max = one_hot_max

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
        num_experts, top_k = w13.shape[0], topk_ids.shape[1]
        experts = _Experts(w13, w2, b13, b2, activation)
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        if 2 * topk_ids.numel() <= num_experts:
            return self._gathered(x, topk_ids, topk_weights, experts)
        if num_experts <= self.max_waste * top_k and x.shape[0] <= self.dense_max_tokens:
            return self._dense(x, topk_ids, topk_weights, experts)

        flat_ids = topk_ids.flatten()
        rank, counts = self._ranks(flat_ids, num_experts)
        width = int(counts.max())  # host sync: sizes the padded groups
        if num_experts * width > self.max_waste * flat_ids.numel():
            return self._grouped(x, flat_ids, counts, topk_weights, experts)
        # Pair p = (token p // k, slot p % k) goes to row `rank` of its expert's group.
        rows = flat_ids * width + rank
        pairs_x = x.repeat_interleave(top_k, dim=0)
        padded = x.new_zeros(num_experts * width, x.shape[1]).index_copy_(0, rows, pairs_x)
        # Every expert's group at once; padding rows compute garbage that is never selected.
        y = experts.batched(padded.view(num_experts, width, -1), experts.w13, experts.w2, None)
        y = y.view(num_experts * width, -1).index_select(0, rows)
        return _weighted_sum(y.view(*topk_ids.shape, -1), topk_weights)

    def _ranks(self, flat_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank of each pair among its expert's pairs, in pair order; pairs per expert)."""
        if flat_ids.numel() * num_experts <= self.one_hot_max:
            seen = F.one_hot(flat_ids, num_experts).cumsum_(0)  # [P, E] running counts
            return seen.gather(1, flat_ids[:, None]).squeeze_(1) - 1, seen[-1]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=num_experts)
        group_start = torch.cumsum(counts, 0) - counts
        sorted_ids = flat_ids[order]
        rank = torch.empty_like(flat_ids)
        rank[order] = (
            torch.arange(flat_ids.numel(), device=flat_ids.device) - group_start[sorted_ids]
        )
        return rank, counts

    @staticmethod
    def _grouped(
        x: torch.Tensor,
        flat_ids: torch.Tensor,
        counts: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: _Experts,
    ) -> torch.Tensor:
        # Stable sort keeps each expert's tokens in token order, like the reference loop.
        order = torch.argsort(flat_ids, stable=True)
        token_ids = order // topk_weights.shape[1]
        x_sorted = x[token_ids]
        outs, start = [], 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                outs.append(experts.one(x_sorted[start : start + count], expert))
                start += count
        y = torch.cat(outs) * topk_weights.flatten()[order, None]
        # Summed in the product's dtype (fp32 with fp32 weights), rounded once, as _weighted_sum.
        return y.new_zeros(x.shape).index_add_(0, token_ids, y).to(x.dtype)

    @staticmethod
    def _gathered(
        x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: _Experts
    ) -> torch.Tensor:
        num_tokens, top_k = topk_ids.shape
        pairs = topk_ids.flatten()
        # Copying the picked experts' weights costs less than the ops of any grouping here.
        xs = x.repeat_interleave(top_k, dim=0)[:, None, :]  # [P, 1, H]
        w13, w2 = experts.w13.index_select(0, pairs), experts.w2.index_select(0, pairs)
        y = experts.batched(xs, w13, w2, pairs).view(num_tokens, top_k, -1)
        return _weighted_sum(y, topk_weights)

    @staticmethod
    def _dense(
        x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: _Experts
    ) -> torch.Tensor:
        num_experts = experts.w13.shape[0]
        # [T, E] routing weights, zero for the experts a token did not pick.
        routing = topk_weights.new_zeros(x.shape[0], num_experts)
        routing.scatter_(1, topk_ids, topk_weights)
        y = experts.batched(x.expand(num_experts, -1, -1), experts.w13, experts.w2, None)
        return (y * routing.t()[:, :, None]).sum(0).to(x.dtype)  # y: [E, T, H]


class _Experts:
    """One layer's expert weights and activation, applied to groups of rows."""

    def __init__(
        self,
        w13: torch.Tensor,
        w2: torch.Tensor,
        b13: torch.Tensor | None,
        b2: torch.Tensor | None,
        activation: Activation,
    ) -> None:
        self.w13, self.w2, self.b13, self.b2 = w13, w2, b13, b2
        self.activation = activation

    def batched(
        self, xs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, bias_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """xs [G, R, H] through expert weights w13 [G, 2I, H] / w2 [G, H, I]; group g's
        biases are row bias_ids[g] of b13 / b2 (None: row g)."""
        h = torch.bmm(xs, w13.transpose(1, 2))
        if self.b13 is not None:
            b13 = self.b13 if bias_ids is None else self.b13.index_select(0, bias_ids)
            h = h + b13[:, None, :]
        y = torch.bmm(self.activation(h), w2.transpose(1, 2))
        if self.b2 is not None:
            b2 = self.b2 if bias_ids is None else self.b2.index_select(0, bias_ids)
            y = y + b2[:, None, :]
        return y

    def one(self, xs: torch.Tensor, expert: int) -> torch.Tensor:
        """Rows xs [R, H] through expert `expert`."""
        b13 = None if self.b13 is None else self.b13[expert]
        b2 = None if self.b2 is None else self.b2[expert]
        return F.linear(self.activation(F.linear(xs, self.w13[expert], b13)), self.w2[expert], b2)


def _weighted_sum(y: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """sum_k y[:, k] * w[:, k] for y [T, k, H], in y's dtype. With fp32 weights the products
    and their sum stay fp32 and are rounded once, as transformers' default (grouped_mm)
    experts do; its eager loop, used on the CPU, rounds each product instead."""
    return (y * topk_weights[:, :, None]).sum(1).to(y.dtype)


DEFAULT_EXPERTS_BACKEND: ExpertsBackend = TorchExpertsBackend()


class FusedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        activation: Activation = silu_and_mul,
    ) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.b13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.activation = activation
        self.backend: ExpertsBackend = DEFAULT_EXPERTS_BACKEND
        # Expert parallel (parallel/tensor_parallel.py, eplb.py): this rank holds physical
        # slots first .. first + count - 1 (w13[j] is slot first + j); a routed expert's
        # replicas are log2phy[e, :logcnt[e]]. None: every expert, numbered as routed.
        self.local_slots: tuple[int, int] | None = None
        self.moe_index = 0  # this layer's position among the MoE layers (EPLB's layer)
        self.log2phy: torch.Tensor | None = None
        self.logcnt: torch.Tensor | None = None
        # All-to-all expert parallel (TPGroup.moe_all_to_all): the group over which this
        # rank's own tokens are sent to the ranks holding their experts, and back. None: the
        # tokens are the same on every rank, and the caller all-reduces the partial sums.
        self.dispatch_group: Any = None
        self.recorder: Any = None  # an eplb.ExpertLoadRecorder counting the routed experts

    def set_placement(
        self, index: int, log2phy: torch.Tensor, logcnt: torch.Tensor, first: int, count: int
    ) -> None:
        """Hold physical slots first .. first + count - 1 of a placement's layer."""
        self.moe_index = index
        self.log2phy, self.logcnt = log2phy, logcnt
        self.local_slots = (first, count)

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.recorder is not None:
            self.recorder.record(self.moe_index, topk_ids)
        if self.dispatch_group is not None:
            return self._forward_all_to_all(x, topk_ids, topk_weights)
        if self.local_slots is not None:
            return self._forward_local(x, topk_ids, topk_weights)
        return self._run(x, topk_ids, topk_weights)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(log2phy, logcnt) on `device`: moved once per placement, not per step."""
        assert self.log2phy is not None and self.logcnt is not None
        if self.log2phy.device != device:
            self.log2phy = self.log2phy.to(device)
            self.logcnt = self.logcnt.to(device)
        return self.log2phy, self.logcnt

    def _forward_all_to_all(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed sum of this rank's own tokens, each (token, slot) pair run on the rank
        holding the replica it picks (DeepEP's "normal" dispatch and combine, all-to-all):

        1. Every pair picks one replica of its expert, by token index shifted by the rank (so
           the ranks' first tokens do not all pick the same replica). The pairs are sorted by
           physical slot, which, slots being laid out rank-major, sorts them by owner too.
        2. Counts: every rank tells every other how many rows each of its slots will get.
        3. Dispatch: the pairs' rows go to their slots' ranks; each rank runs its experts on
           what it received, with unit weights.
        4. Combine: the results come back in the order they were sent, and each token sums
           its k results times its routing weights here, as the single-process layer does.

        An idle rank (no tokens) takes part with zero rows; every rank makes the same number
        of calls per layer, whatever its token count."""
        group = self.dispatch_group
        _, count = self.local_slots  # type: ignore[misc]  # slot p lives on rank p // count
        log2phy, logcnt = self._tables(topk_ids.device)
        num_tokens, top_k = topk_ids.shape
        hidden = self.w2.shape[1]
        tokens = torch.arange(num_tokens, device=topk_ids.device)[:, None]
        replicas = logcnt[topk_ids]
        physical = log2phy[topk_ids, (tokens + group.rank) % replicas].flatten()
        order = torch.argsort(physical, stable=True)  # stable: token order inside a slot
        per_slot = torch.bincount(physical, minlength=group.size * count)
        per_slot = per_slot.view(group.size, count)
        ones = [1] * group.size
        # recv_per_slot[r, j]: rows rank r sends to this rank's slot j.
        recv_per_slot = group.all_to_all(per_slot, ones, ones)
        send, recv = per_slot.sum(1).tolist(), recv_per_slot.sum(1).tolist()  # host sync
        rows = group.all_to_all(x[order // top_k], send, recv)
        # Received rows come source rank by source rank, slot by slot inside each.
        slot = torch.arange(count, device=x.device).repeat(group.size)
        slot = slot.repeat_interleave(recv_per_slot.flatten().to(x.device))
        y = self._run(rows, slot[:, None], rows.new_ones(rows.shape[0], 1))
        back = group.all_to_all(y, recv, send)
        pairs = torch.empty_like(back).index_copy_(0, order, back)  # back in pair order
        return _weighted_sum(pairs.view(num_tokens, top_k, hidden), topk_weights)

    def _forward_local(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """This rank's share of the routed sum. Each (token, slot) pair goes to one replica
        of its expert, chosen by token index among the replicas: the same choice on every
        rank (they all see the same routing), so each pair runs exactly once somewhere. The
        pairs whose replica is here run as one-expert rows; the layer's all-reduce adds the
        other ranks' shares."""
        first, count = self.local_slots  # type: ignore[misc]
        log2phy, logcnt = self._tables(topk_ids.device)
        tokens = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]
        physical = log2phy[topk_ids, tokens % logcnt[topk_ids]]
        local = (physical >= first) & (physical < first + count)
        token, slot = local.nonzero(as_tuple=True)
        out = torch.zeros(x.shape[0], self.w2.shape[1], dtype=x.dtype, device=x.device)
        if token.numel():
            ids = (physical[token, slot] - first)[:, None]
            rows = self._run(x[token], ids, topk_weights[token, slot][:, None])
            out.index_add_(0, token, rows.to(out.dtype))
        return out

    def _run(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.backend.forward(
            x,
            topk_ids,
            topk_weights,
            self.w13,
            self.w2,
            b13=self.b13,
            b2=self.b2,
            activation=self.activation,
        )


class GroupedTopkRouter(nn.Module):
    """DeepSeek-V3 / GLM-4.5 routing, computed in fp32 as transformers does.

    Scores are sigmoid(x @ weight.T). The choice adds `e_score_correction_bias` (learned
    load balancing, never part of the weights), keeps the `topk_group` groups whose two best
    scores sum highest, and takes the top-k experts inside them. The weights are the plain
    scores of those experts, renormalised when `renormalize`, times `scaling`."""

    # Kept in fp32 whatever the model dtype (the loader sees to it), as transformers keeps
    # them: in bf16 the rounded bias and weights pick different experts at near-ties.
    fp32_parameters = ("weight", "e_score_correction_bias")

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        n_group: int,
        topk_group: int,
        scaling: float,
        fp32_weights: bool = False,
    ) -> None:
        super().__init__()
        if num_experts % n_group:
            raise ValueError(
                f"n_routed_experts ({num_experts}) must be a multiple of n_group ({n_group})"
            )
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))
        self.top_k, self.renormalize = top_k, renormalize
        self.n_group, self.topk_group, self.scaling = n_group, topk_group, scaling
        self.fp32_weights = fp32_weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights [T, k], fp32 or in x's dtype; topk_ids [T, k] int64)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            # Sizes spelled out: a view of no tokens cannot infer a -1 (idle DP ranks).
            groups = choice.view(x.shape[0], self.n_group, choice.shape[1] // self.n_group)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = groups.masked_fill(mask[:, :, None], float("-inf")).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        return (weights if self.fp32_weights else weights.to(x.dtype)), ids


class SparseMoE(nn.Module):
    """Router (`gate`) + routed experts (+ optional shared expert).

    The router is a linear [E, H] (with a bias when `router_bias`) followed by the top-k rule
    `router` names (module docstring), or, with `router="sigmoid_grouped"`, a
    GroupedTopkRouter. `fp32_weights` keeps the routing weights in fp32 up to their product
    with each expert's output (see DecoderConfig)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        router: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        shared_intermediate_size: int = 0,
        fp32_weights: bool = False,
        router_bias: bool = False,
        expert_bias: bool = False,
        activation: Activation = silu_and_mul,
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.fp32_weights = fp32_weights
        self.router = router
        self.gate: nn.Module
        if router in ("softmax", "topk_softmax", "sigmoid_topk_input"):
            self.gate = nn.Linear(hidden_size, num_experts, bias=router_bias)
        elif router == "sigmoid_grouped":
            self.gate = GroupedTopkRouter(
                hidden_size,
                num_experts,
                top_k,
                renormalize,
                n_group,
                topk_group,
                routed_scaling_factor,
                fp32_weights,
            )
        else:
            raise ValueError(
                "router must be 'softmax', 'topk_softmax', 'sigmoid_grouped' or "
                f"'sigmoid_topk_input', got {router!r}"
            )
        self.experts = FusedExperts(
            num_experts, hidden_size, intermediate_size, expert_bias, activation
        )
        # Always-on shared expert (DeepSeek, GLM, Llama 4), added to the routed sum.
        self.shared_experts: nn.Module | None = (
            SwiGLUMLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gate, GroupedTopkRouter):
            weights, ids = self.gate(x)
        elif self.router == "topk_softmax":
            weights, ids = topk_softmax(self.gate(x), self.top_k)
        elif self.router == "sigmoid_topk_input":
            out = self._input_weighted(x)
            return out if self.shared_experts is None else out + self.shared_experts(x)
        else:
            weights, ids = softmax_topk(
                self.gate(x), self.top_k, self.renormalize, self.fp32_weights
            )
        out = self.experts(x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def _input_weighted(self, x: torch.Tensor) -> torch.Tensor:
        """Llama 4: expert e sees x * w_e (rounded to x's dtype) and its output is added
        unscaled. Each top-k slot is one pass of the experts with unit weights."""
        weights, ids = sigmoid_topk(self.gate(x), self.top_k)
        ones = weights.new_ones(x.shape[0], 1)
        out = self.experts(x * weights[:, :1], ids[:, :1], ones)
        for slot in range(1, self.top_k):
            out = out + self.experts(x * weights[:, slot : slot + 1], ids[:, slot : slot + 1], ones)
        return out


def set_experts_backend(model: nn.Module, backend: ExpertsBackend) -> None:
    """Route every MoE layer of `model` through `backend` (e.g. a fused GPU kernel)."""
    for module in model.modules():
        if isinstance(module, FusedExperts):
            module.backend = backend
            w13, w2 = backend.prepare_weights(module.w13.data, module.w2.data)
            module.w13.data, module.w2.data = w13, w2
