"""The process-group layout of one engine replica on torch.distributed.

One engine replica is `tp_size` ranks (pipeline parallelism is 1, so the world is the TP
group). Expert parallelism and DP attention do not add ranks; they subdivide the same ones
(SGLang's layout):

- **Expert parallel** (`ep_size` divides `tp_size`): the ranks form `ep_size` blocks of
  `moe_tp_size = tp_size / ep_size` consecutive ranks. Every rank of block `e` holds the same
  `num_experts / ep_size` experts, split tensor-parallel over the block (the moe-TP group).
  An EP group is one rank from each block (same position inside its block): the ranks that
  exchange tokens with all-to-all.
- **DP attention** (`attention_dp_size` divides `tp_size`): the ranks form `attention_dp_size`
  blocks of `attn_tp_size = tp_size / attention_dp_size` consecutive ranks. Each block runs
  attention on its own batch with its own scheduler and KV cache, tensor-parallel inside the
  block (the attention-TP group). An attention-DP group is one rank from each block.

For a global rank `r` (0 <= r < world_size):

    node_rank    = r // procs_per_node         local_rank   = r % procs_per_node
    tp_rank      = r
    ep_rank      = r // moe_tp_size            moe_tp_rank  = r % moe_tp_size
    attn_dp_rank = r // attn_tp_size           attn_tp_rank = r % attn_tp_size

Ranks are node-major, so the consecutive blocks (moe-TP, attention-TP) stay inside a node
whenever their size divides `procs_per_node`: their all-reduces, the heaviest traffic, run
over NVLink, and only the strided groups (EP all-to-all, attention-DP gathers) cross nodes.

`ParallelConfig` and `RankLayout` are pure arithmetic (no torch.distributed), so the layout
can be checked at config time. `ParallelState` creates the torch process groups once
`torch.distributed` is initialized; `init_parallel` / `destroy_parallel` do both ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# torch.distributed's own default for gloo/nccl collectives is 30 minutes; an inference engine
# should notice a dead peer sooner, but model loading can legitimately take minutes.
DEFAULT_DIST_TIMEOUT_S = 600.0


class ParallelConfigError(ValueError):
    """The parallel sizes do not fit together or do not fit the declared hardware."""


def _check_size(name: str, value: Any) -> None:
    # bool is an int subclass; `tensor_parallel_size: true` in a config is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParallelConfigError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ParallelConfigError(f"{name} must be >= 1, got {value}")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(frozen=True)
class RankLayout:
    """Where one global rank sits in every group (see the module docstring for the mapping)."""

    rank: int
    local_rank: int
    node_rank: int
    tp_rank: int
    ep_rank: int
    moe_tp_rank: int
    attn_dp_rank: int
    attn_tp_rank: int

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class GroupLayout:
    """The rank lists of every group kind; each kind's lists partition the world."""

    tp: list[list[int]]
    ep: list[list[int]]
    moe_tp: list[list[int]]
    attn_dp: list[list[int]]
    attn_tp: list[list[int]]

    def items(self) -> Iterator[tuple[str, list[list[int]]]]:
        """(kind, rank lists) in a fixed order: the order every rank creates the groups in."""
        for f in fields(self):
            yield f.name, getattr(self, f.name)

    def containing(self, kind: str, rank: int) -> list[int]:
        """The `kind` group that `rank` belongs to."""
        for ranks in getattr(self, kind):
            if rank in ranks:
                return ranks
        raise ValueError(f"rank {rank} is in no {kind} group")


def _blocks(world: int, size: int) -> list[list[int]]:
    """Consecutive blocks of `size` ranks: [0..size), [size..2*size), ..."""
    return [list(range(start, start + size)) for start in range(0, world, size)]


def _strided(world: int, stride: int) -> list[list[int]]:
    """One rank from each consecutive block of `stride` ranks, same offset inside the block."""
    return [list(range(offset, world, stride)) for offset in range(stride)]


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel sizes of one engine replica.

    `tp_size` ranks make the whole replica; `ep_size` and `attention_dp_size` subdivide them
    (both must divide `tp_size`); `node_count` nodes each run `procs_per_node` of the ranks.
    Full engine replicas (the spec's `data_parallel_size`) are separate worlds and not
    described here.
    """

    tp_size: int
    ep_size: int = 1
    attention_dp_size: int = 1
    node_count: int = 1

    def __post_init__(self) -> None:
        # Validate at construction so no invalid config can exist; the device check needs
        # outside knowledge and lives in `validate`.
        _check_size("tensor_parallel_size", self.tp_size)
        _check_size("expert_parallel_size", self.ep_size)
        _check_size("attention_dp_size", self.attention_dp_size)
        _check_size("node_count", self.node_count)
        if self.tp_size % self.ep_size:
            raise ParallelConfigError(
                f"expert_parallel_size {self.ep_size} must divide tensor_parallel_size "
                f"{self.tp_size}: each EP rank's experts are split over tp/ep ranks"
            )
        if self.tp_size % self.attention_dp_size:
            raise ParallelConfigError(
                f"attention_dp_size {self.attention_dp_size} must divide tensor_parallel_size "
                f"{self.tp_size}: each attention-DP group runs attention on tp/dp ranks"
            )
        if self.world_size % self.node_count:
            raise ParallelConfigError(
                f"node_count {self.node_count} must divide the world size "
                f"(tensor_parallel_size {self.tp_size}): every node runs the same number of ranks"
            )

    # -- derived sizes ---------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.tp_size  # x pipeline_parallel_size, which is 1

    @property
    def procs_per_node(self) -> int:
        return self.world_size // self.node_count

    @property
    def moe_tp_size(self) -> int:
        return self.tp_size // self.ep_size

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.attention_dp_size

    # -- checks and construction -----------------------------------------------------------

    def validate(self, available_devices: int | None = None) -> ParallelConfig:
        """Check that each node has a device per rank; `None` skips it (CPU / gloo).

        Returns self so it chains: `ParallelConfig(...).validate(gpus_per_node)`.
        """
        if available_devices is None:
            return self
        if available_devices < self.procs_per_node:
            raise ParallelConfigError(
                f"tensor_parallel_size {self.tp_size} needs {self.procs_per_node} GPUs per node "
                f"x {_plural(self.node_count, 'node')}, resources declare {available_devices}"
            )
        return self

    @classmethod
    def from_spec(cls, parallel: Any, hardware: Any) -> ParallelConfig:
        """Build from the deployment spec's `ParallelSpec` and `HardwareSpec` (duck-typed).

        The spec's deployment replica holds `data_parallel_size` full engine replicas on
        `hardware.node_count` nodes (its world is tp x dp, the GPUs of the replica). One engine
        replica therefore spans node_count / dp nodes when dp < node_count, else one node.
        """
        tp = parallel.tensor_parallel_size
        replicas = parallel.data_parallel_size
        nodes = hardware.node_count
        dp_attn = parallel.attention_dp_size if parallel.enable_attention_dp else 1
        config = cls(
            tp_size=tp,
            ep_size=parallel.expert_parallel_size or 1,
            attention_dp_size=dp_attn,
            node_count=_engine_nodes(nodes, replicas),
        )
        # gpus_per_node is 0 without an accelerator: CPU ranks are processes, not devices.
        gpus = hardware.gpus_per_node
        return config.validate(gpus if gpus else None)

    # -- layout ----------------------------------------------------------------------------

    def layout(self, rank: int) -> RankLayout:
        """The position of global `rank` in every group (pure arithmetic)."""
        if not 0 <= rank < self.world_size:
            raise ParallelConfigError(f"rank {rank} is outside the world [0, {self.world_size})")
        return RankLayout(
            rank=rank,
            local_rank=rank % self.procs_per_node,
            node_rank=rank // self.procs_per_node,
            tp_rank=rank,
            ep_rank=rank // self.moe_tp_size,
            moe_tp_rank=rank % self.moe_tp_size,
            attn_dp_rank=rank // self.attn_tp_size,
            attn_tp_rank=rank % self.attn_tp_size,
        )

    def node_ranks(self, node_rank: int) -> list[int]:
        """The global ranks that node `node_rank` runs."""
        if not 0 <= node_rank < self.node_count:
            raise ParallelConfigError(
                f"node_rank {node_rank} is outside [0, node_count {self.node_count})"
            )
        start = node_rank * self.procs_per_node
        return list(range(start, start + self.procs_per_node))

    def groups(self) -> GroupLayout:
        """Every group's rank list, identical on every rank (that is what new_group needs)."""
        world = self.world_size
        return GroupLayout(
            tp=[list(range(world))],
            ep=_strided(world, self.moe_tp_size),
            moe_tp=_blocks(world, self.moe_tp_size),
            attn_dp=_strided(world, self.attn_tp_size),
            attn_tp=_blocks(world, self.attn_tp_size),
        )


def _engine_nodes(nodes: int, replicas: int) -> int:
    """How many of the deployment replica's `nodes` one of its `replicas` engines spans."""
    _check_size("node_count", nodes)
    _check_size("data_parallel_size", replicas)
    if nodes >= replicas and nodes % replicas == 0:
        return nodes // replicas
    if replicas % nodes == 0:
        return 1
    raise ParallelConfigError(
        f"data_parallel_size {replicas} engine replicas cannot be spread evenly over "
        f"node_count {nodes} nodes: one must divide the other"
    )


def default_backend(device: str | torch.device) -> str:
    """NCCL for CUDA devices (also RCCL on ROCm, which reports 'cuda'), else gloo."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


# -- process groups ---------------------------------------------------------------------------


class ParallelState:
    """This rank's torch.distributed groups; build after `init_process_group`.

    Every rank creates every group of every kind, in `GroupLayout.items()` order: torch's
    `new_group` is collective over the world, so ranks that skipped or reordered one would
    pair up the wrong groups. A group equal to the world reuses the default group instead of
    a second communicator (NCCL communicators cost GPU memory); that choice is the same on all
    ranks, so the order stays aligned.
    """

    def __init__(self, config: ParallelConfig, rank: int | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; call init_parallel")
        world = dist.get_world_size()
        if world != config.world_size:
            raise ParallelConfigError(
                f"torch.distributed world size is {world}, the parallel config needs "
                f"{config.world_size} (tensor_parallel_size {config.tp_size})"
            )
        self.config = config
        self.rank = dist.get_rank() if rank is None else rank
        self.layout = config.layout(self.rank)
        self.groups = config.groups()
        self.world: dist.ProcessGroup = dist.group.WORLD
        own = self._create_groups()
        self.tp_group = own["tp"]
        self.ep_group = own["ep"]
        self.moe_tp_group = own["moe_tp"]
        self.attn_dp_group = own["attn_dp"]
        self.attn_tp_group = own["attn_tp"]
        # NCCL tensors live on this rank's GPU; gloo's on the CPU.
        if dist.get_backend() == "nccl":
            self.device = torch.device("cuda", self.layout.local_rank)
        else:
            self.device = torch.device("cpu")

    def _create_groups(self) -> dict[str, dist.ProcessGroup]:
        world = list(range(self.config.world_size))
        own: dict[str, dist.ProcessGroup] = {}
        for kind, rank_lists in self.groups.items():
            for ranks in rank_lists:
                group = self.world if ranks == world else dist.new_group(ranks)
                if self.rank in ranks:
                    own[kind] = group
        return own

    @property
    def tp_size(self) -> int:
        return self.config.tp_size

    def all_reduce_tp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, in place; returns the tensor (untouched with one rank)."""
        return all_reduce(tensor, self.tp_group, self.config.tp_size)

    def all_gather_tp(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every TP rank's tensor along `dim`, in rank order."""
        return all_gather(tensor, self.tp_group, self.config.tp_size, dim)


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """Sum `tensor` in place over `group` of `size` ranks; skips the call for one rank."""
    if size > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def all_gather(
    tensor: torch.Tensor, group: dist.ProcessGroup, size: int, dim: int = -1
) -> torch.Tensor:
    """Concatenate `tensor` from each of `size` ranks along `dim`, in group-rank order."""
    if size == 1:
        return tensor
    # The list form, not all_gather_into_tensor: gloo rejects its stacked output shape, and
    # torch 2.13 deprecates it for all_gather_single, which 2.11 lacks.
    # (empty_like keeps a transposed input's strides, so take them from the contiguous copy.)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=dim)


# -- process-wide init / teardown ---------------------------------------------------------------

_STATE: ParallelState | None = None


def init_parallel(
    config: ParallelConfig,
    rank: int | None = None,
    *,
    backend: str = "gloo",
    init_method: str | None = None,
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
) -> ParallelState:
    """Join the world as `rank` and create the groups; the state is also `get_parallel_state()`.

    `rank` defaults to the RANK environment variable and `init_method` to "env://"
    (MASTER_ADDR / MASTER_PORT), the torchrun convention; "tcp://host:port" works too.
    When torch.distributed is already initialized (a torchrun-started script), only the
    groups are created.
    """
    global _STATE
    if rank is None:
        rank = int(os.environ["RANK"])
    layout = config.layout(rank)
    if backend == "nccl":
        # Bind the GPU before NCCL creates communicators, or every rank would use GPU 0.
        torch.cuda.set_device(layout.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            world_size=config.world_size,
            rank=rank,
            timeout=timedelta(seconds=timeout_s),
        )
    _STATE = ParallelState(config, rank)
    return _STATE


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError("parallel state is not initialized; call init_parallel first")
    return _STATE


def destroy_parallel() -> None:
    """Tear down every group (subgroups go with the default one); safe to call twice."""
    global _STATE
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()
