"""The parallel layout (pure arithmetic) and launching ranks on torch.distributed with gloo.

The launch tests start real processes (spawn start method, gloo on CPU); every one is bounded
by the launcher's own `timeout_s` or a subprocess timeout, since a hung collective would
otherwise hang the suite. The rank functions live at module level: spawned ranks import this
module by name to find them.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist

from bisllm_server.engine.parallel.launch import (
    LaunchError,
    free_port,
    from_env,
    spawn_local,
)
from bisllm_server.engine.parallel.state import (
    ParallelConfig,
    ParallelConfigError,
    default_backend,
    destroy_parallel,
    get_parallel_state,
    init_parallel,
)

LAUNCH_TIMEOUT_S = 90.0  # per launch; a healthy one takes a few seconds
DIST_TIMEOUT_S = 60.0
KINDS = ("tp", "ep", "moe_tp", "attn_dp", "attn_tp")
# The rank fields that say where a rank sits inside each kind of group.
POSITION = {
    "tp": "tp_rank",
    "ep": "ep_rank",
    "moe_tp": "moe_tp_rank",
    "attn_dp": "attn_dp_rank",
    "attn_tp": "attn_tp_rank",
}


# -- ParallelConfig arithmetic and errors --------------------------------------------------


def test_derived_sizes():
    config = ParallelConfig(tp_size=8, ep_size=4, attention_dp_size=2, node_count=2)
    assert config.world_size == 8
    assert config.procs_per_node == 4
    assert config.moe_tp_size == 2
    assert config.attn_tp_size == 4
    assert config.node_ranks(1) == [4, 5, 6, 7]
    assert ParallelConfig(tp_size=1).groups().tp == [[0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp_size": 0}, "tensor_parallel_size must be >= 1, got 0"),
        ({"tp_size": True}, "tensor_parallel_size must be an integer"),
        ({"tp_size": 2.0}, "tensor_parallel_size must be an integer"),
        ({"tp_size": 4, "ep_size": 0}, "expert_parallel_size must be >= 1"),
        ({"tp_size": 4, "ep_size": 3}, "expert_parallel_size 3 must divide tensor_parallel_size 4"),
        ({"tp_size": 4, "attention_dp_size": 8}, "attention_dp_size 8 must divide"),
        ({"tp_size": 4, "node_count": 0}, "node_count must be >= 1"),
        ({"tp_size": 4, "node_count": 3}, "node_count 3 must divide the world size"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message):
        ParallelConfig(**kwargs)


def test_validate_against_devices():
    with pytest.raises(ParallelConfigError) as info:
        ParallelConfig(tp_size=8).validate(4)
    assert str(info.value) == (
        "tensor_parallel_size 8 needs 8 GPUs per node x 1 node, resources declare 4"
    )
    with pytest.raises(ParallelConfigError, match="needs 8 GPUs per node x 2 nodes"):
        ParallelConfig(tp_size=16, node_count=2).validate(4)
    config = ParallelConfig(tp_size=16, node_count=2)
    assert config.validate(8) is config
    assert config.validate(None) is config


def _spec(tp=2, dp=1, ep=1, attention_dp=False, gpus=2, nodes=1):
    """Duck-typed ParallelSpec / HardwareSpec, computed the way bisllm_truss/spec.py does."""
    parallel = SimpleNamespace(
        tensor_parallel_size=tp,
        data_parallel_size=dp,
        expert_parallel_size=ep,
        enable_attention_dp=attention_dp,
        attention_dp_size=tp if attention_dp else 1,
        world_size=tp * dp,
    )
    hardware = SimpleNamespace(
        accelerator="H100" if gpus else None,
        gpus_per_node=gpus,
        node_count=nodes,
        total_gpus=gpus * nodes,
    )
    return parallel, hardware


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (_spec(), ParallelConfig(tp_size=2)),
        (_spec(tp=8, ep=8, attention_dp=True, gpus=8), ParallelConfig(8, 8, 8)),
        # One engine across two nodes of 8.
        (_spec(tp=16, ep=4, gpus=8, nodes=2), ParallelConfig(16, 4, node_count=2)),
        # Two full engine replicas, one per node.
        (_spec(tp=8, dp=2, gpus=8, nodes=2), ParallelConfig(8)),
        # Two engine replicas on one node of 8.
        (_spec(tp=4, dp=2, gpus=8), ParallelConfig(4)),
        # No accelerator: CPU ranks, no device check.
        (_spec(tp=4, gpus=0), ParallelConfig(4)),
    ],
)
def test_from_spec(spec, expected):
    assert ParallelConfig.from_spec(*spec) == expected


def test_from_spec_checks_devices_and_replicas():
    with pytest.raises(ParallelConfigError, match="resources declare 4"):
        ParallelConfig.from_spec(*_spec(tp=8, gpus=4))
    with pytest.raises(ParallelConfigError, match=r"data_parallel_size 2 .* node_count 3"):
        ParallelConfig.from_spec(*_spec(tp=12, dp=2, gpus=8, nodes=3))


def test_from_the_real_spec(valid_spec):
    # conftest's base config: H100:2, tensor_parallel_size 2.
    config = ParallelConfig.from_spec(valid_spec.parallel, valid_spec.hardware)
    assert config == ParallelConfig(tp_size=2)


# -- layouts and groups ---------------------------------------------------------------------


def test_groups_tp4_ep2_dp2_two_nodes():
    config = ParallelConfig(tp_size=4, ep_size=2, attention_dp_size=2, node_count=2)
    groups = config.groups()
    assert groups.tp == [[0, 1, 2, 3]]
    assert groups.ep == [[0, 2], [1, 3]]  # one rank from each moe-TP block
    assert groups.moe_tp == [[0, 1], [2, 3]]  # consecutive: inside a node
    assert groups.attn_dp == [[0, 2], [1, 3]]
    assert groups.attn_tp == [[0, 1], [2, 3]]
    assert config.layout(3).as_dict() == {
        "rank": 3,
        "local_rank": 1,
        "node_rank": 1,
        "tp_rank": 3,
        "ep_rank": 1,
        "moe_tp_rank": 1,
        "attn_dp_rank": 1,
        "attn_tp_rank": 1,
    }


@pytest.mark.parametrize(
    "config",
    [
        ParallelConfig(tp_size=4, ep_size=2, attention_dp_size=2, node_count=2),
        ParallelConfig(tp_size=8, ep_size=4, attention_dp_size=2, node_count=2),
        ParallelConfig(tp_size=8, ep_size=8, attention_dp_size=8),
        ParallelConfig(tp_size=16, ep_size=2, attention_dp_size=4, node_count=4),
        ParallelConfig(tp_size=1),
    ],
)
def test_groups_partition_the_world_and_agree_with_layouts(config):
    world = list(range(config.world_size))
    groups = config.groups()
    assert [kind for kind, _ in groups.items()] == list(KINDS)
    for kind, rank_lists in groups.items():
        assert sorted(r for ranks in rank_lists for r in ranks) == world, kind
    for rank in world:
        layout = config.layout(rank)
        node = config.node_ranks(layout.node_rank)
        assert node.index(rank) == layout.local_rank
        # A rank's group-rank in the consecutive groups is its index there.
        assert groups.containing("tp", rank).index(rank) == layout.tp_rank
        assert groups.containing("moe_tp", rank).index(rank) == layout.moe_tp_rank
        assert groups.containing("attn_tp", rank).index(rank) == layout.attn_tp_rank
        # ... and in the strided ones it is which block it came from.
        assert groups.containing("ep", rank).index(rank) == layout.ep_rank
        assert groups.containing("attn_dp", rank).index(rank) == layout.attn_dp_rank
        # An EP group holds every expert shard once: distinct ep_ranks, one moe_tp_rank.
        ep = [config.layout(r) for r in groups.containing("ep", rank)]
        assert sorted(m.ep_rank for m in ep) == list(range(config.ep_size))
        assert {m.moe_tp_rank for m in ep} == {layout.moe_tp_rank}
    with pytest.raises(ParallelConfigError, match="outside the world"):
        config.layout(config.world_size)


def test_default_backend():
    assert default_backend("cuda") == "nccl"
    assert default_backend(torch.device("cuda", 1)) == "nccl"
    assert default_backend("cpu") == "gloo"


# -- the environment form -------------------------------------------------------------------


def test_from_env():
    env = from_env(environ={})
    assert (env.master_addr, env.master_port, env.node_rank, env.node_count) == (
        "127.0.0.1",
        29500,
        0,
        1,
    )
    config = ParallelConfig(tp_size=16, node_count=2)
    env = from_env(
        config,
        environ={"MASTER_ADDR": "leader.svc", "MASTER_PORT": "1234", "NODE_RANK": "1"},
    )
    assert (env.master_addr, env.master_port, env.node_rank, env.node_count) == (
        "leader.svc",
        1234,
        1,
        2,
    )
    with pytest.raises(ParallelConfigError, match="MASTER_ADDR must be set when NNODES is 2"):
        from_env(environ={"NNODES": "2"})
    with pytest.raises(ParallelConfigError, match="NODE_RANK 2 is outside"):
        from_env(environ={"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "x"})
    with pytest.raises(ParallelConfigError, match="MASTER_PORT must be an integer"):
        from_env(environ={"MASTER_PORT": "http"})
    with pytest.raises(ParallelConfigError, match=r"NNODES 1 does not match .* node_count 2"):
        from_env(config, environ={"NNODES": "1"})


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- one rank in this process ---------------------------------------------------------------


def test_single_rank_in_process_is_all_no_ops():
    state = init_parallel(
        ParallelConfig(tp_size=1),
        0,
        backend="gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        timeout_s=DIST_TIMEOUT_S,
    )
    try:
        assert get_parallel_state() is state
        # A group equal to the world is the default group, not a second communicator.
        for group in (state.tp_group, state.ep_group, state.attn_tp_group, state.attn_dp_group):
            assert group is state.world
        x = torch.arange(6.0).reshape(2, 3)
        assert state.all_reduce_tp(x) is x
        assert state.all_gather_tp(x, dim=0) is x
        assert state.device == torch.device("cpu")
    finally:
        destroy_parallel()
    assert not dist.is_initialized()
    destroy_parallel()  # twice is fine
    with pytest.raises(RuntimeError, match="not initialized"):
        get_parallel_state()


# -- spawn_local ----------------------------------------------------------------------------


def _group_ranks(state: Any) -> dict[str, list[int]]:
    return {
        "tp": dist.get_process_group_ranks(state.tp_group),
        "ep": dist.get_process_group_ranks(state.ep_group),
        "moe_tp": dist.get_process_group_ranks(state.moe_tp_group),
        "attn_dp": dist.get_process_group_ranks(state.attn_dp_group),
        "attn_tp": dist.get_process_group_ranks(state.attn_tp_group),
    }


def collectives(state: Any, scale: float) -> dict[str, Any]:
    """Rank function: the TP helpers on known inputs, plus where this rank thinks it is."""
    rank = state.rank
    summed = state.all_reduce_tp(torch.full((3,), scale * (rank + 1)))
    column = torch.tensor([[rank], [10 + rank]], dtype=torch.float32)  # (2, 1)
    return {
        "layout": state.layout.as_dict(),
        "sum": summed.tolist(),
        "gather_last": state.all_gather_tp(column, dim=-1).tolist(),
        "gather_first": state.all_gather_tp(column.t(), dim=0).tolist(),  # non-contiguous
        "groups": _group_ranks(state),
        "env": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")},
    }


def test_spawn_local_collectives_and_layouts():
    config = ParallelConfig(tp_size=2, ep_size=2)
    start = time.monotonic()
    results = spawn_local(
        collectives,
        config,
        args=(10.0,),
        timeout_s=LAUNCH_TIMEOUT_S,
        dist_timeout_s=DIST_TIMEOUT_S,
    )
    assert time.monotonic() - start < LAUNCH_TIMEOUT_S
    assert len(results) == 2
    for rank, result in enumerate(results):
        assert result["layout"] == config.layout(rank).as_dict()
        assert result["sum"] == [30.0, 30.0, 30.0]  # 10 * (1 + 2)
        assert result["gather_last"] == [[0.0, 1.0], [10.0, 11.0]]
        assert result["gather_first"] == [[0.0, 10.0], [1.0, 11.0]]
        for kind in KINDS:
            assert result["groups"][kind] == config.groups().containing(kind, rank), kind
        assert result["env"]["RANK"] == str(rank)
        assert result["env"]["LOCAL_RANK"] == str(rank)
        assert result["env"]["WORLD_SIZE"] == "2"
    assert results[0]["env"]["MASTER_PORT"] == results[1]["env"]["MASTER_PORT"]


def _new_children(before: set[int]) -> list[psutil.Process]:
    """Our descendants not alive before, minus multiprocessing's resource tracker (which
    the spawn start method keeps for the life of this process)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in before or "resource_tracker" in " ".join(child.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        found.append(child)
    return found


def fail_on_rank_one(state: Any) -> None:
    """Rank function: rank 1 raises; rank 0 hangs, so the launcher must terminate it."""
    if state.rank == 1:
        raise ValueError("boom on rank 1")
    time.sleep(LAUNCH_TIMEOUT_S)


def sleep_forever(state: Any) -> None:
    time.sleep(LAUNCH_TIMEOUT_S)


def test_spawn_local_names_the_failing_rank_and_cleans_up():
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        spawn_local(
            fail_on_rank_one,
            ParallelConfig(tp_size=2),
            timeout_s=LAUNCH_TIMEOUT_S,
            dist_timeout_s=DIST_TIMEOUT_S,
        )
    assert time.monotonic() - start < LAUNCH_TIMEOUT_S  # it did not wait for rank 0
    assert info.value.rank == 1
    assert "rank 1 failed" in str(info.value)
    assert "ValueError: boom on rank 1" in info.value.details
    assert _new_children(before) == []


def test_spawn_local_timeout_names_the_ranks_and_cleans_up():
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    # The deadline may pass while the ranks are still starting; it names them all the same.
    with pytest.raises(LaunchError, match=r"rank\(s\) \[0\] did not finish within 2 s"):
        spawn_local(sleep_forever, ParallelConfig(tp_size=1), timeout_s=2.0)
    assert _new_children(before) == []


def die_without_reporting(state: Any) -> None:
    os._exit(3)  # what a segfault or the OOM killer looks like to the launcher


def test_spawn_local_reports_a_rank_that_dies():
    with pytest.raises(LaunchError, match=r"rank 0 exited \(exit code 3\) without reporting"):
        spawn_local(die_without_reporting, ParallelConfig(tp_size=1), timeout_s=LAUNCH_TIMEOUT_S)


def test_spawn_local_rejects_a_function_spawn_cannot_import():
    before = {child.pid for child in psutil.Process().children(recursive=True)}

    def local(state: Any) -> None:  # not importable by name in the child
        pass

    with pytest.raises((AttributeError, pickle.PicklingError), match="local"):
        spawn_local(local, ParallelConfig(tp_size=2), timeout_s=LAUNCH_TIMEOUT_S)
    assert _new_children(before) == []


def test_spawn_local_is_one_node():
    with pytest.raises(ParallelConfigError, match="node_count 2; run node_main"):
        spawn_local(collectives, ParallelConfig(tp_size=2, node_count=2))


# -- two "nodes" as two OS processes ----------------------------------------------------------


def report_world(state: Any) -> dict[str, Any]:
    """Rank function: all-reduce the global ranks; report layout and actual group members."""
    total = state.all_reduce_tp(torch.tensor([float(state.rank)]))
    return {
        "rank": state.rank,
        "sum": total.item(),
        "layout": state.layout.as_dict(),
        "groups": _group_ranks(state),
    }


# A node's launcher: what each pod runs in the Kubernetes form, with the rendezvous passed in.
NODE_SCRIPT = """
import json, sys
from bisllm_server.engine.parallel.launch import node_main
from bisllm_server.engine.parallel.state import ParallelConfig
from test_parallel_launch import report_world

node_rank, port, tp, init_method = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = ParallelConfig(tp_size=tp, ep_size=2, attention_dp_size=2, node_count=2)
results = node_main(
    report_world, config, node_rank=node_rank, master_addr="127.0.0.1", master_port=port,
    init_method=init_method, timeout_s=float(sys.argv[5]), dist_timeout_s=float(sys.argv[6]),
)
print("RESULTS " + json.dumps(results), flush=True)
"""


def _run_nodes(tp: int, init_method: str) -> list[list[dict[str, Any]]]:
    port = free_port()
    env = dict(os.environ)
    # The ranks import this module by name to find report_world.
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH")) if p)
    limits = (str(LAUNCH_TIMEOUT_S), str(DIST_TIMEOUT_S))
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                NODE_SCRIPT,
                str(node_rank),
                str(port),
                str(tp),
                init_method,
                *limits,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node_rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=LAUNCH_TIMEOUT_S + 30)
            assert node.returncode == 0, err
            line = next(line for line in out.splitlines() if line.startswith("RESULTS "))
            outputs.append(json.loads(line.removeprefix("RESULTS ")))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()  # its ranks exit on their own when their launcher dies
                node.wait(timeout=10)
    return outputs


@pytest.mark.parametrize(("tp", "init_method"), [(2, "env"), (4, "tcp")])
def test_two_nodes_rendezvous(tp, init_method):
    config = ParallelConfig(tp_size=tp, ep_size=2, attention_dp_size=2, node_count=2)
    outputs = _run_nodes(tp, init_method)
    expected_groups = config.groups()
    for node_rank, results in enumerate(outputs):
        assert [r["rank"] for r in results] == config.node_ranks(node_rank)
        for result in results:
            rank = result["rank"]
            assert result["sum"] == sum(range(tp))
            assert result["layout"] == config.layout(rank).as_dict()
            assert result["layout"]["node_rank"] == node_rank
            for kind in KINDS:
                assert result["groups"][kind] == expected_groups.containing(kind, rank), kind
    # Both nodes built the same groups: the lists their ranks report make up every group.
    for kind in KINDS:
        reported = {tuple(r["groups"][kind]) for results in outputs for r in results}
        assert sorted(reported) == sorted(tuple(g) for g in getattr(expected_groups, kind))
