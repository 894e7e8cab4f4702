"""Expert-parallel load balancing (EPLB): where each MoE expert's weights live, and how many copies.

Under expert parallelism every EP rank holds a fixed number of expert "slots". Routing is
decided by the model, so a few popular experts can make the ranks that hold them the
stragglers of every forward pass. EPLB counts the tokens each expert received over a recent
window and then chooses a new placement: popular experts get extra copies (redundant slots),
and the copies are spread so every rank carries about the same number of tokens.

Layout. A placement is per MoE layer. There are E logical experts (the model's) and
P = E + redundant physical slots, laid out rank-major: rank r owns slots
[r * P/R, (r + 1) * P/R) for R ranks, so P must be a multiple of R. Three tables describe it:

    phy2log[layer, slot]         the logical expert whose weights sit in that slot
    log2phy[layer, expert, k]    the k-th slot holding that expert, in slot order, -1 padded
                                 (k < P - E + 1, the most copies one expert can have)
    logcnt[layer, expert]        how many slots hold the expert (always >= 1)

A slot's share of the work is its expert's load divided by the expert's replica count (the
dispatcher spreads an expert's tokens over its replicas), and a rank's load is the sum over
its slots. The quality figure is max rank load / mean rank load per layer; 1.0 is perfect.

The policy (after DeepSeek's EPLB). Experts come in G contiguous groups; models with
group-limited routing send a token to few groups, so keeping a group on one node keeps its
traffic off the slower inter-node links. When the N nodes divide G the policy is hierarchical:

1. Sum each group's load and pack the groups onto nodes, G/N per node: heaviest group first,
   each to the currently lightest node that still has room.
2. Inside each node, start with one slot per expert and give the node's remaining slots one
   at a time to the expert whose load per replica is the highest.
3. Pack the node's slots (each carrying its load per replica) onto the node's R/N ranks with
   the same greedy packing, P/R slots per rank.

Otherwise the policy is global: the same three steps with one group and one node, so step 1
does nothing and replication and packing see every expert and every rank at once.

Every sort is stable and every tie goes to the lowest index, so the same load always gives the
same placement; all ranks can compute it independently and agree without communicating.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ExpertLoadRecorder",
    "ExpertPlacement",
    "map_to_physical",
    "placement_from_phy2log",
    "rebalance",
]


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field is ambiguous
class ExpertPlacement:
    """Which logical expert each physical slot holds, per layer, and the inverse tables.

    All tables are int64, on the CPU unless moved with `to`; see the module docstring for their
    meaning. log2phy's last dimension is always P - E + 1 (the most replicas one expert can
    get), so every placement for the same sizes has the same shapes and can be copied into
    preallocated device tables in place.
    """

    phy2log: Tensor  # [L, P]
    log2phy: Tensor  # [L, E, P - E + 1], -1 padded
    logcnt: Tensor  # [L, E]
    num_ranks: int

    def __post_init__(self) -> None:
        if self.phy2log.dim() != 2 or self.logcnt.dim() != 2 or self.log2phy.dim() != 3:
            raise ValueError("phy2log and logcnt must be 2-D and log2phy 3-D")
        layers, experts = self.logcnt.shape
        if self.phy2log.shape[0] != layers or tuple(self.log2phy.shape[:2]) != (layers, experts):
            raise ValueError("phy2log, log2phy and logcnt disagree on layers or experts")
        _check_slots_divide_ranks(self.num_physical, self.num_ranks)

    def to(self, device: torch.device | str) -> ExpertPlacement:
        """The same placement with its tables on `device` (where map_to_physical's ids live)."""
        return dataclasses.replace(
            self,
            phy2log=self.phy2log.to(device),
            log2phy=self.log2phy.to(device),
            logcnt=self.logcnt.to(device),
        )

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_logical(self) -> int:
        return self.logcnt.shape[1]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    def slot_loads(self, weight: Tensor) -> Tensor:
        """[L, P] float64: each slot's share of its expert's load (load / replica count)."""
        weight = _as_load(weight, self.num_layers, self.num_logical)
        per_replica = weight / self.logcnt.to("cpu", torch.float64)
        return per_replica.gather(1, self.phy2log.cpu())

    def rank_loads(self, weight: Tensor) -> Tensor:
        """[L, num_ranks] float64: the tokens each rank processes, per layer."""
        slots = self.slot_loads(weight)
        return slots.view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(-1)

    def imbalance(self, weight: Tensor) -> Tensor:
        """[L] float64: max rank load / mean rank load; 1.0 (balanced) for a layer with no load."""
        loads = self.rank_loads(weight)
        mean = loads.mean(-1)
        ratio = loads.amax(-1) / mean.clamp_min(torch.finfo(torch.float64).tiny)
        return torch.where(mean > 0, ratio, torch.ones_like(ratio))

    @classmethod
    def trivial(
        cls, num_layers: int, num_logical: int, num_ranks: int, num_redundant: int = 0
    ) -> ExpertPlacement:
        """The static layout: slot i holds expert i % num_logical in every layer.

        The redundant slots (after the first num_logical) repeat experts 0, 1, ... in order.
        """
        _check_positive(num_layers=num_layers, num_logical=num_logical, num_ranks=num_ranks)
        if num_redundant < 0:
            raise ValueError(f"num_redundant must be >= 0, got {num_redundant}")
        num_physical = num_logical + num_redundant
        _check_slots_divide_ranks(num_physical, num_ranks)
        row = torch.arange(num_physical, dtype=torch.int64) % num_logical
        return placement_from_phy2log(row.expand(num_layers, -1).clone(), num_logical, num_ranks)


def placement_from_phy2log(phy2log: Tensor, num_logical: int, num_ranks: int) -> ExpertPlacement:
    """Build the inverse tables for a slot -> expert assignment ([L, P] int64)."""
    phy2log = phy2log.to(device="cpu", dtype=torch.int64)
    if phy2log.numel() and (phy2log.min() < 0 or phy2log.max() >= num_logical):
        raise ValueError(f"phy2log holds ids outside [0, {num_logical})")
    layers, slots = phy2log.shape
    logcnt = torch.zeros(layers, num_logical, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    if (logcnt == 0).any():
        raise ValueError("every logical expert needs at least one physical slot")
    # Sorting the slots by expert (stably, so slot order survives inside an expert) lines up
    # each expert's replicas; a slot's replica index is its distance from its run's start.
    by_expert = torch.sort(phy2log, dim=1, stable=True)
    run_start = torch.cumsum(logcnt, dim=1) - logcnt
    replica = torch.arange(slots).expand(layers, -1) - run_start.gather(1, by_expert.values)
    max_replicas = slots - num_logical + 1
    log2phy = torch.full((layers, num_logical, max_replicas), -1, dtype=torch.int64)
    layer_index = torch.arange(layers).unsqueeze(1).expand(-1, slots)
    log2phy[layer_index, by_expert.values, replica] = by_expert.indices
    return ExpertPlacement(phy2log=phy2log, log2phy=log2phy, logcnt=logcnt, num_ranks=num_ranks)


def rebalance(
    weight: Tensor, *, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int
) -> ExpertPlacement:
    """A placement of `weight`'s experts ([L, E] token counts) that evens out the ranks' load.

    Hierarchical (groups kept on one node) when num_nodes divides num_groups, otherwise
    global; see the module docstring. Deterministic for a given weight.
    """
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be [num_layers, num_logical], got shape {tuple(weight.shape)}"
        )
    num_layers, num_logical = weight.shape
    _check_positive(
        num_physical=num_physical, num_groups=num_groups, num_nodes=num_nodes, num_ranks=num_ranks
    )
    if num_physical < num_logical:
        raise ValueError(f"num_physical ({num_physical}) must be >= num_logical ({num_logical})")
    _check_slots_divide_ranks(num_physical, num_ranks)
    if num_ranks % num_nodes:
        raise ValueError(f"num_ranks ({num_ranks}) must be a multiple of num_nodes ({num_nodes})")
    if num_logical % num_groups:
        raise ValueError(
            f"num_logical ({num_logical}) must be a multiple of num_groups ({num_groups})"
        )
    load = _as_load(weight, num_layers, num_logical)
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1
    phy2log = _hierarchical(load, num_physical, num_groups, num_nodes, num_ranks)
    return placement_from_phy2log(phy2log, num_logical, num_ranks)


def _hierarchical(
    load: Tensor, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int
) -> Tensor:
    """phy2log [L, P] for float64 load [L, E]; the three steps of the module docstring."""
    layers, num_logical = load.shape
    group_size = num_logical // num_groups
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical // num_nodes

    # Step 1: groups onto nodes. Renumber the experts node by node ("node-major" ids) so that
    # node n's experts are the contiguous block [n * experts_per_node, (n + 1) * ...).
    group_load = load.view(layers, num_groups, group_size).sum(-1)
    node, position = _balanced_packing(group_load, num_nodes)
    first_id = (node * (num_groups // num_nodes) + position) * group_size
    log2node_major = (first_id.unsqueeze(-1) + torch.arange(group_size)).view(layers, num_logical)
    node_major2log = _inverse_permutation(log2node_major)

    # Step 2: replicate inside each node; the rows of node_load are (layer, node) pairs.
    node_load = load.gather(1, node_major2log).view(layers * num_nodes, experts_per_node)
    slot2local, replicas = _replicate(node_load, slots_per_node)

    # Step 3: the node's slots onto its ranks, each slot weighing its expert's load per replica.
    slot_load = (node_load / replicas).gather(1, slot2local)
    rank, position = _balanced_packing(slot_load, num_ranks // num_nodes)
    new_slot = rank * (num_physical // num_ranks) + position
    packed2local = torch.empty_like(slot2local).scatter_(1, new_slot, slot2local)

    # Back to global ids: node n's local expert i is node-major id n * experts_per_node + i.
    node_offset = (torch.arange(num_nodes) * experts_per_node).view(1, num_nodes, 1)
    packed2node_major = packed2local.view(layers, num_nodes, slots_per_node) + node_offset
    return node_major2log.gather(1, packed2node_major.view(layers, num_physical))


def _balanced_packing(weights: Tensor, num_packs: int) -> tuple[Tensor, Tensor]:
    """Greedy equal-count packing, row by row: (pack, position within pack), both [rows, n].

    Items go heaviest first (stable, so equal weights keep index order), each to the lightest
    pack that still has room (the lowest index among equally light ones). Sizes here are
    small (hundreds of items), so plain Python on lists is fast enough and easy to follow.
    """
    rows, items = weights.shape
    capacity = items // num_packs
    pack = torch.empty(rows, items, dtype=torch.int64)
    position = torch.empty(rows, items, dtype=torch.int64)
    for row, values in enumerate(weights.tolist()):
        pack_row, position_row = _pack_one(values, num_packs, capacity)
        pack[row] = torch.tensor(pack_row, dtype=torch.int64)
        position[row] = torch.tensor(position_row, dtype=torch.int64)
    return pack, position


def _pack_one(values: list[float], num_packs: int, capacity: int) -> tuple[list[int], list[int]]:
    pack_load = [0.0] * num_packs
    pack_size = [0] * num_packs
    pack = [0] * len(values)
    position = [0] * len(values)
    for item in sorted(range(len(values)), key=lambda i: -values[i]):
        open_packs = [p for p in range(num_packs) if pack_size[p] < capacity]
        chosen = min(open_packs, key=pack_load.__getitem__)
        pack[item] = chosen
        position[item] = pack_size[chosen]
        pack_load[chosen] += values[item]
        pack_size[chosen] += 1
    return pack, position


def _replicate(load: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """Fill num_slots slots per row: one per expert, then each extra to the expert with the
    highest load per replica. Returns (slot -> expert [rows, num_slots], replicas [rows, E])."""
    rows, experts = load.shape
    slot2expert = torch.empty(rows, num_slots, dtype=torch.int64)
    slot2expert[:, :experts] = torch.arange(experts)
    replicas = torch.ones(rows, experts, dtype=torch.int64)
    every_row = torch.arange(rows)
    for slot in range(experts, num_slots):
        # argmax returns the first maximum, which is the lowest-index tie-break we promise.
        hottest = (load / replicas).argmax(-1)
        slot2expert[:, slot] = hottest
        replicas[every_row, hottest] += 1
    return slot2expert, replicas


def _inverse_permutation(perm: Tensor) -> Tensor:
    """Row-wise inverse of a batch of permutations [rows, n]."""
    source = torch.arange(perm.shape[1]).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, source)


def map_to_physical(
    topk_ids: Tensor,
    placement: ExpertPlacement,
    layer: int,
    *,
    rank: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Physical slot ids (int64, topk_ids' shape and device) for one layer's routed logical ids.

    - rank given ("static"): a replica on that rank when the expert has one, which keeps the
      token off the network, else the expert's first replica.
    - generator given ("dynamic"): a uniformly random replica per token, drawn from generator.
    - neither: the first replica.
    """
    if rank is not None and generator is not None:
        raise ValueError("pass rank (static dispatch) or generator (dynamic), not both")
    if not 0 <= layer < placement.num_layers:
        raise ValueError(f"layer must be in [0, {placement.num_layers}), got {layer}")
    if rank is not None and not 0 <= rank < placement.num_ranks:
        raise ValueError(f"rank must be in [0, {placement.num_ranks}), got {rank}")
    # Work where the ids live; a placement moved there once with .to() makes these no-ops.
    device = topk_ids.device
    ids = topk_ids.long()
    replicas = placement.log2phy[layer].to(device)
    if generator is not None:
        return _random_replica(ids, replicas, placement.logcnt[layer].to(device), generator)
    if rank is None:
        table = replicas[:, 0]
    else:
        table = _static_table(replicas, rank, placement.slots_per_rank)
    return table[ids]


def _static_table(replicas: Tensor, rank: int, slots_per_rank: int) -> Tensor:
    """[E] slot per logical expert for a token on `rank`: a local replica, else the first."""
    local = (replicas >= 0) & (replicas // slots_per_rank == rank)
    # argmax over 0/1 finds the first local replica; an all-zero row gives index 0 (the first).
    choice = local.to(torch.int32).argmax(-1, keepdim=True)
    return replicas.gather(1, choice).squeeze(1)


def _random_replica(
    ids: Tensor, replicas: Tensor, logcnt: Tensor, generator: torch.Generator
) -> Tensor:
    counts = logcnt[ids]
    # Drawn on the generator's device (torch requires it), then moved next to the ids.
    uniform = torch.rand(ids.shape, generator=generator, device=generator.device)
    # floor(u * n) is uniform over 0..n-1; the clamp guards u * n rounding up to n.
    scaled = uniform.to(ids.device, torch.float64) * counts
    pick = scaled.long().clamp_max(counts - 1)
    return replicas[ids, pick]


class ExpertLoadRecorder:
    """Tokens per (layer, logical expert) over the last `window` closed forward passes.

    A circular buffer [window, L, E]: `record` adds one layer's routed ids to the open pass,
    `step` closes it (overwriting the oldest pass), and `load` sums the closed passes.
    """

    def __init__(
        self,
        num_layers: int,
        num_logical: int,
        window: int,
        device: torch.device | str | None = None,
    ) -> None:
        _check_positive(num_layers=num_layers, num_logical=num_logical, window=window)
        self.num_layers = num_layers
        self.num_logical = num_logical
        self.window = window
        # One extra column collects negative ids (padding, dropped tokens) so recording needs
        # no data-dependent masking, which would force a device sync on a GPU.
        self._passes = torch.zeros(
            window, num_layers, num_logical + 1, dtype=torch.int64, device=device
        )
        self._open = torch.zeros(num_layers, num_logical + 1, dtype=torch.int64, device=device)
        self._next = 0
        self.num_passes = 0  # passes closed so far, including those that left the window

    def record(self, layer: int, topk_ids: Tensor) -> None:
        """Count this pass's routed ids (any shape) for `layer`; ids < 0 are ignored."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        ids = topk_ids.reshape(-1).long().to(self._open.device)
        if ids.device.type == "cpu" and ids.numel() and int(ids.max()) >= self.num_logical:
            raise ValueError(f"topk_ids must be < num_logical ({self.num_logical})")
        ids = torch.where(ids < 0, self.num_logical, ids)
        # index_add_ rather than bincount: bincount sizes its output from the data (a sync).
        self._open[layer].index_add_(0, ids, torch.ones_like(ids))

    def step(self) -> None:
        """Close the open pass: it replaces the oldest one in the window."""
        self._passes[self._next].copy_(self._open)
        self._open.zero_()
        self._next = (self._next + 1) % self.window
        self.num_passes += 1

    def load(self) -> Tensor:
        """[L, E] int64 tokens per expert over the closed passes still in the window."""
        return self._passes.sum(0)[:, : self.num_logical]

    def reset(self) -> None:
        self._passes.zero_()
        self._open.zero_()
        self._next = 0
        self.num_passes = 0


def _as_load(weight: Tensor, num_layers: int, num_logical: int) -> Tensor:
    """weight as a float64 CPU tensor of the expected shape (float64: exact ties, stable sums)."""
    if tuple(weight.shape) != (num_layers, num_logical):
        raise ValueError(
            f"weight must have shape ({num_layers}, {num_logical}), got {tuple(weight.shape)}"
        )
    load = weight.detach().to(device="cpu", dtype=torch.float64).contiguous()
    if (load < 0).any():
        raise ValueError("weight (token counts) must be >= 0")
    return load


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_slots_divide_ranks(num_physical: int, num_ranks: int) -> None:
    if num_ranks < 1 or num_physical % num_ranks:
        raise ValueError(
            f"num_physical ({num_physical}) must be a multiple of num_ranks ({num_ranks})"
        )
