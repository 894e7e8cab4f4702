"""One rank of a parallel engine replica as a server process: what `bisllm serve` runs in each
process the launcher (engine/parallel/launch.py) starts.

- **Tensor parallel**: global rank 0 serves the OpenAI API and leads; every other rank (on
  this node or another) follows its steps and serves nothing (engine/parallel/lockstep.py).
- **DP attention**: every rank serves the API on its own port with its own scheduler and KV
  cache, so a router sees each rank as a worker and a KV target; the ranks step together.

A rank whose engine fails ends its server and raises, so the launcher stops the whole replica
(a replica with a dead rank cannot compute anything) and `bisllm serve` exits non-zero.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import uvicorn

from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.parallel.lockstep import (
    DPAttentionPacer,
    LeaderPacer,
    StepFollower,
    StepLeader,
)
from bisllm_server.engine.parallel.state import ParallelState
from bisllm_server.engine.parallel.tensor_parallel import engine_group
from bisllm_server.openai.launch import (
    RankEngine,
    ServeOptions,
    WorkerServer,
    build_server,
    engine_config,
)
from bisllm_server.openai.node_metrics import add_node_metrics_route

log = logging.getLogger("bisllm.server")

LEADER = 0  # the global rank that serves a tensor-parallel replica


@dataclass(frozen=True)
class RankServeArgs:
    """What every rank process needs (pickled to it by the launcher)."""

    spec: Any  # the validated DeploymentSpec
    model_dir: Path
    options: ServeOptions
    host: str
    ports: list[int]  # the HTTP port of each of this node's ranks that serves, by local rank
    log_level: str = "info"


def serves_http(state: ParallelState) -> bool:
    return state.config.attention_dp_size > 1 or state.layout.rank == LEADER


def serve_rank(state: ParallelState, args: RankServeArgs) -> None:
    """The body of one rank process; returns when the replica is stopped."""
    tp = engine_group(state)
    options = _rank_options(args.options, state.layout.local_rank)
    # Step messages and the DP ranks' agreement travel on a CPU group whatever the model's
    # collectives use; every rank creates it, in the same order.
    control = dist.new_group(list(range(state.config.world_size)), backend="gloo")
    if not serves_http(state):
        _follow(state, args, options, tp, StepFollower(control, LEADER))
        return
    if tp.dp_attention:
        rank = RankEngine(tp, pacer=DPAttentionPacer(control))
        port = args.ports[state.layout.local_rank]
    else:
        leader = StepLeader(control, LEADER)
        rank = RankEngine(tp, leader, LeaderPacer(leader))
        port = args.ports[0]
    _serve(state, args, options, rank, port)


def _rank_options(options: ServeOptions, local_rank: int) -> ServeOptions:
    """Each rank on its own GPU of the node (CPU ranks share the cores)."""
    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    return replace(options, device=device)


def _follow(
    state: ParallelState,
    args: RankServeArgs,
    options: ServeOptions,
    tp: Any,
    follower: StepFollower,
) -> None:
    # The leader ends the replica (a stop message after its graceful shutdown); a signal here
    # must not cut the collectives it still needs for the requests in flight.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    llm = LLMEngine(engine_config(args.spec, args.model_dir, options), tp=tp, lockstep=follower)
    log.info("rank %d follows rank %d", state.layout.rank, LEADER)
    llm.follow()


class _ServerSlot:
    """The rank's uvicorn server, told to exit if the engine fails (once it exists)."""

    def __init__(self) -> None:
        self.server: uvicorn.Server | None = None
        self.failed = False

    def engine_failed(self, exc: BaseException) -> None:
        self.failed = True
        if self.server is not None:
            self.server.should_exit = True


def _serve(
    state: ParallelState,
    args: RankServeArgs,
    options: ServeOptions,
    rank: RankEngine,
    port: int,
) -> None:
    slot = _ServerSlot()
    app, engine = build_server(
        args.spec, args.model_dir, options, rank=replace(rank, on_error=slot.engine_failed)
    )
    if rank.tp.dp_attention and state.layout.local_rank == 0:
        # One scrape target per pod for Prometheus' annotations: this node's every rank.
        first = state.layout.rank
        ranks = [(first + i, f"http://127.0.0.1:{p}") for i, p in enumerate(args.ports)]
        add_node_metrics_route(app, ranks)
    slot.server = WorkerServer(
        uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level)
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # handler that would end the process before the engine tells its peers to stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("rank %d serves on %s:%d", state.layout.rank, args.host, port)
    try:
        if not slot.failed:
            slot.server.run()
    finally:
        engine.shutdown()
    if engine.error is not None:
        raise RuntimeError(f"rank {state.layout.rank}: the engine failed") from engine.error
