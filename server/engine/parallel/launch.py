"""Starting the ranks of one engine replica, torchrun-style.

- One machine: `spawn_local(fn, config)` starts all `world_size` ranks.
- Several machines: every node runs `node_main(fn, config, node_rank=..., master_addr=...,
  master_port=...)`, which starts that node's `procs_per_node` ranks (global rank =
  node_rank x procs_per_node + local_rank). They meet at master_addr:master_port, where
  global rank 0 (on node 0) hosts torch.distributed's TCP store. In Kubernetes (one pod per
  node, e.g. a LeaderWorkerSet) the pod gets the rendezvous through the standard variables
  MASTER_ADDR, MASTER_PORT, NODE_RANK and NNODES, read by `from_env()`.

Each rank is a fresh process (the spawn start method: CUDA cannot be used in a forked child)
that sets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, ...), calls `init_parallel`,
runs `fn(state, *args)`, destroys the process groups and sends its return value back over a
pipe. The launcher raises `LaunchError` naming the rank, with its traceback, as soon as one
rank fails, dies or runs past the deadline, and never leaves a rank process behind.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from typing import Any, Literal

import torch
import torch.multiprocessing as torch_mp

from bisllm_server.engine.parallel.state import (
    DEFAULT_DIST_TIMEOUT_S,
    ParallelConfig,
    ParallelConfigError,
    destroy_parallel,
    init_parallel,
)

# torchrun's default rendezvous port, used when MASTER_PORT is not set.
DEFAULT_MASTER_PORT = 29500
# How long a rank that has reported may take to exit before it is terminated.
EXIT_GRACE_S = 30.0
# How often a rank checks that its launcher is still alive.
_PARENT_POLL_S = 0.5
# How often a launcher with a stop event looks at it.
_STOP_POLL_S = 0.2

InitMethod = Literal["env", "tcp"]
RankFn = Callable[..., Any]


class LaunchError(RuntimeError):
    """One or more ranks failed, died or timed out.

    `rank` is the first of `ranks`, `details` its traceback text, `failed_at` when it was
    reported (time.time(), so the earliest of several failures, usually the cause, wins).
    """

    def __init__(
        self, ranks: Sequence[int], message: str, details: str = "", failed_at: float = 0.0
    ) -> None:
        self.ranks = tuple(ranks)
        self.rank = self.ranks[0]
        self.details = details
        self.failed_at = failed_at or time.time()
        super().__init__(f"{message}\n{details}" if details else message)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago: bind port 0 and read back what the OS chose.

    Another process could take it before rank 0 binds it; torch's own tests accept the same
    small race, and a clash shows as a clear rendezvous error rather than a wrong result.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# -- the environment of a node (Kubernetes form) --------------------------------------------


@dataclass(frozen=True)
class NodeEnv:
    """Where this node sits in the launch, from torchrun's standard variables."""

    master_addr: str
    master_port: int
    node_rank: int
    node_count: int


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ParallelConfigError(f"{name} must be an integer, got {raw!r}") from None


def from_env(
    config: ParallelConfig | None = None, environ: Mapping[str, str] | None = None
) -> NodeEnv:
    """Read MASTER_ADDR, MASTER_PORT, NODE_RANK and NNODES (checked against `config`).

    Single-node defaults: 127.0.0.1, port 29500, node 0 of 1. With several nodes the master
    address has no sensible default, so it must be set.
    """
    env = os.environ if environ is None else environ
    node_count = _env_int(env, "NNODES", config.node_count if config else 1)
    node_rank = _env_int(env, "NODE_RANK", 0)
    master_port = _env_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
    master_addr = env.get("MASTER_ADDR") or ""
    if not master_addr:
        if node_count > 1:
            raise ParallelConfigError(f"MASTER_ADDR must be set when NNODES is {node_count}")
        master_addr = "127.0.0.1"
    if not 0 <= node_rank < node_count:
        raise ParallelConfigError(f"NODE_RANK {node_rank} is outside [0, NNODES {node_count})")
    if not 0 < master_port < 65536:
        raise ParallelConfigError(f"MASTER_PORT {master_port} is not a TCP port")
    if config is not None and node_count != config.node_count:
        raise ParallelConfigError(
            f"NNODES {node_count} does not match the parallel config's node_count "
            f"{config.node_count}"
        )
    return NodeEnv(master_addr, master_port, node_rank, node_count)


# -- inside a rank process ------------------------------------------------------------------


@dataclass(frozen=True)
class _RankSpec:
    """Everything a rank process needs besides `fn` and its args (pickled to the child)."""

    config: ParallelConfig
    rank: int
    master_addr: str
    master_port: int
    backend: str
    init_method: InitMethod
    dist_timeout_s: float
    parent_pid: int

    def url(self) -> str:
        if self.init_method == "env":
            return "env://"
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


def _set_torchrun_env(spec: _RankSpec) -> None:
    """The variables torchrun sets, so code inside `fn` (and env://) finds what it expects."""
    layout = spec.config.layout(spec.rank)
    os.environ.update(
        RANK=str(spec.rank),
        LOCAL_RANK=str(layout.local_rank),
        WORLD_SIZE=str(spec.config.world_size),
        LOCAL_WORLD_SIZE=str(spec.config.procs_per_node),
        NODE_RANK=str(layout.node_rank),
        GROUP_RANK=str(layout.node_rank),
        MASTER_ADDR=spec.master_addr,
        MASTER_PORT=str(spec.master_port),
    )


def _share_cpu_threads(procs_per_node: int) -> None:
    """Split the CPU cores between this node's ranks unless OMP_NUM_THREADS says otherwise.

    Every rank would otherwise start one intra-op thread per core and they would fight (most
    visible with gloo on CPU). torchrun sets OMP_NUM_THREADS=1; sharing keeps CPU-only
    engines fast too.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // procs_per_node))


def _exit_with_parent(parent_pid: int) -> None:
    """Exit if the launcher dies (e.g. SIGKILL), which no `finally` in it can handle.

    A polling thread rather than Linux's PR_SET_PDEATHSIG: portable, and a rank orphaned
    mid-collective would otherwise hold its GPU until the collective times out.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _rank_main(spec: _RankSpec, fn: RankFn, args: tuple[Any, ...], conn: Any) -> None:
    """Entry point of one rank process: init, run, tear down, report through `conn`."""
    _exit_with_parent(spec.parent_pid)
    _set_torchrun_env(spec)
    _share_cpu_threads(spec.config.procs_per_node)
    try:
        state = init_parallel(
            spec.config,
            spec.rank,
            backend=spec.backend,
            init_method=spec.url(),
            timeout_s=spec.dist_timeout_s,
        )
        value = fn(state, *args)
        destroy_parallel()
        # Plain pickle, not the pipe's ForkingPickler: torch registers reducers there that
        # pass tensors as shared memory owned by this process, which is about to exit.
        payload = pickle.dumps(value)
    except BaseException:
        conn.send(("error", (traceback.format_exc(), time.time())))
        conn.close()
        # Peers may be blocked in a collective with us; the launcher terminates them.
        sys.exit(1)
    conn.send(("ok", payload))
    conn.close()


# -- the launcher side -------------------------------------------------------------------------


@dataclass
class _Rank:
    rank: int
    process: Any  # a multiprocessing SpawnProcess
    conn: Any  # the read end of its result pipe


def _start_ranks(
    fn: RankFn, args: tuple[Any, ...], specs: list[_RankSpec], started: list[_Rank]
) -> None:
    """Start one process per spec, appending to `started` as it goes (so cleanup sees all)."""
    ctx = torch_mp.get_context("spawn")
    for spec in specs:
        reader, writer = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=_rank_main, args=(spec, fn, args, writer), name=f"rank-{spec.rank}"
        )
        try:
            process.start()  # raises before creating a child if fn or args do not pickle
        except BaseException:
            reader.close()
            raise
        finally:
            # Drop our copy of the write end, so a rank that dies reads as EOF on the pipe.
            writer.close()
        started.append(_Rank(spec.rank, process, reader))


def _receive(rank: _Rank) -> Any:
    """The rank's return value, or LaunchError if it failed or died without reporting."""
    try:
        status, payload = rank.conn.recv()
    except EOFError:
        rank.process.join(timeout=5)
        raise LaunchError(
            [rank.rank],
            f"rank {rank.rank} exited (exit code {rank.process.exitcode}) "
            "without reporting a result",
        ) from None
    if status == "error":
        details, failed_at = payload
        raise LaunchError([rank.rank], f"rank {rank.rank} failed:", details, failed_at)
    try:
        return pickle.loads(payload)
    except Exception:  # e.g. a class the rank returned that this process cannot import
        raise LaunchError(
            [rank.rank],
            f"rank {rank.rank}'s return value cannot be unpickled by the launcher:",
            traceback.format_exc(),
        ) from None


def _collect(
    ranks: list[_Rank], timeout_s: float | None, stop: threading.Event | None = None
) -> dict[int, Any]:
    """Wait for every rank's report; raise on the first failure or at the deadline. Once
    `stop` is set, every rank still running gets SIGTERM and EXIT_GRACE_S to report."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waiting = {rank.conn: rank for rank in ranks}
    results: dict[int, Any] = {}
    stopping = False
    while waiting:
        if stop is not None and stop.is_set() and not stopping:
            stopping = True
            for rank in waiting.values():
                rank.process.terminate()
            grace = time.monotonic() + EXIT_GRACE_S
            deadline = grace if deadline is None else min(deadline, grace)
            timeout_s = EXIT_GRACE_S if timeout_s is None else min(timeout_s, EXIT_GRACE_S)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            late = sorted(rank.rank for rank in waiting.values())
            raise LaunchError(late, f"rank(s) {late} did not finish within {timeout_s:g} s")
        if stop is not None and not stopping:
            remaining = _STOP_POLL_S if remaining is None else min(remaining, _STOP_POLL_S)
        # Blocks on the pipes only: a rank that dies closes its pipe, which wakes us too.
        failures = []
        for conn in connection.wait(list(waiting), timeout=remaining):
            rank = waiting.pop(conn)
            try:
                results[rank.rank] = _receive(rank)
            except LaunchError as error:
                failures.append(error)
        if failures:
            # A failing rank breaks its peers' collectives too; the first to fail is the cause.
            raise min(failures, key=lambda error: error.failed_at)
    return results


def _stop(ranks: list[_Rank], grace_s: float) -> None:
    """Give ranks `grace_s` to exit, then SIGTERM, then SIGKILL; reap them all."""
    deadline = time.monotonic() + grace_s
    for rank in ranks:
        rank.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for rank in ranks:
        if rank.process.is_alive():
            rank.process.terminate()
    for rank in ranks:
        rank.process.join(timeout=5)
        if rank.process.is_alive():
            rank.process.kill()
            rank.process.join()
        rank.conn.close()


def node_main(
    fn: RankFn,
    config: ParallelConfig,
    *,
    node_rank: int,
    master_addr: str,
    master_port: int,
    args: tuple[Any, ...] = (),
    backend: str = "gloo",
    init_method: InitMethod = "env",
    timeout_s: float | None = None,
    dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
    stop: threading.Event | None = None,
) -> list[Any]:
    """Run this node's ranks of `config` to completion; their return values by local rank.

    Each rank calls `fn(state: ParallelState, *args)`; `fn` and the return values must pickle
    (`fn` a module-level function). `timeout_s` bounds the whole run (None: a server runs
    until it stops); `dist_timeout_s` bounds the rendezvous and each collective. Setting
    `stop` (e.g. from a signal handler) sends the ranks SIGTERM and waits for their reports.
    """
    if init_method not in ("env", "tcp"):
        raise ValueError(f"init_method must be 'env' or 'tcp', got {init_method!r}")
    specs = [
        _RankSpec(
            config=config,
            rank=rank,
            master_addr=master_addr,
            master_port=master_port,
            backend=backend,
            init_method=init_method,
            dist_timeout_s=dist_timeout_s,
            parent_pid=os.getpid(),
        )
        for rank in config.node_ranks(node_rank)
    ]
    started: list[_Rank] = []
    grace_s = 0.0  # on failure, stop the survivors at once: they may be stuck in a collective
    try:
        _start_ranks(fn, args, specs, started)
        results = _collect(started, timeout_s, stop)
        grace_s = EXIT_GRACE_S  # every rank reported; let them finish exiting on their own
        return [results[spec.rank] for spec in specs]
    finally:
        _stop(started, grace_s)


def spawn_local(
    fn: RankFn,
    config: ParallelConfig,
    *,
    args: tuple[Any, ...] = (),
    backend: str = "gloo",
    master_port: int | None = None,
    init_method: InitMethod = "env",
    timeout_s: float | None = None,
    dist_timeout_s: float = DEFAULT_DIST_TIMEOUT_S,
    stop: threading.Event | None = None,
) -> list[Any]:
    """Run all `world_size` ranks on this machine; their return values by rank.

    The single-node case of `node_main`, rendezvousing on 127.0.0.1 at `master_port` (a free
    one by default).
    """
    if config.node_count != 1:
        raise ParallelConfigError(
            f"spawn_local runs one node, the parallel config has node_count {config.node_count}; "
            "run node_main on each node"
        )
    return node_main(
        fn,
        config,
        node_rank=0,
        master_addr="127.0.0.1",
        master_port=free_port() if master_port is None else master_port,
        args=args,
        backend=backend,
        init_method=init_method,
        timeout_s=timeout_s,
        dist_timeout_s=dist_timeout_s,
        stop=stop,
    )


__all__ = [
    "DEFAULT_MASTER_PORT",
    "LaunchError",
    "NodeEnv",
    "free_port",
    "from_env",
    "node_main",
    "spawn_local",
]
