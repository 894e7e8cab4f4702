"""Tensor parallelism on torch.distributed with gloo: two processes, each an engine over its
shard of the model, fed the same requests, produce exactly the greedy tokens of the
single-process engine. The variants cover GQA heads split across ranks, one KV head shared
by both ranks, dense and MoE layers with a tied head, row-parallel biases, and DeepSeek-V3's
MLA heads (latent cache whole on each rank) with grouped routing and shared experts. Each
rank reads only its slices of the checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine_correctness import IGNORE_EOS, MIN_TOKENS, assert_no_leaked_pages, params
from test_spec_decode import PROMPTS

from bisllm_server.engine.config import EngineConfig, EngineConfigError
from bisllm_server.engine.engine import LLMEngine, RequestError
from bisllm_server.engine.loader import load_model
from bisllm_server.engine.parallel.tensor_parallel import (
    TensorParallelError,
    TPGroup,
    engine_group,
)
from bisllm_server.router.fleet import free_ports

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
MODES = [IGNORE_EOS, MIN_TOKENS] * (len(PROMPTS) // 2)


def config(path: str) -> EngineConfig:
    return EngineConfig(model=path, dtype="float32", page_size=4, max_batch_size=8)


def generate(llm: LLMEngine) -> list[list[int]]:
    """The test prompts in one continuous batch: the tokens of each."""
    rids = [llm.add_request(p, params(m)) for p, m in zip(PROMPTS, MODES, strict=True)]
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    while llm.has_unfinished_requests():
        for out in llm.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert_no_leaked_pages(llm)
    return [tokens[rid] for rid in rids]


@contextlib.contextmanager
def joined(rank: int, port: int) -> Iterator[None]:
    """This process as `rank` of a gloo world of WORLD (one thread each, as on 2 cores)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank(rank: int, path: str, port: int, results: Any, ep_size: int = 1) -> None:
    with joined(rank, port):
        tp = TPGroup(rank, WORLD, ep_size=ep_size)
        loaded = load_model(path, dtype="float32", tp=tp)
        llm = LLMEngine(config(path), model=loaded.model, model_config=loaded.config, tp=tp)
        tokens = generate(llm)
        results.put((rank, tokens, loaded.bytes_read, loaded.config.num_kv_heads))


def run_tensor_parallel(path: str, ep_size: int = 1) -> dict[int, tuple[list[list[int]], int, int]]:
    context = mp.get_context("spawn")
    results = context.Queue()
    (port,) = free_ports(1)
    mp.start_processes(
        _rank, args=(path, port, results, ep_size), nprocs=WORLD, join=True, start_method="spawn"
    )
    out = {}
    for _ in range(WORLD):
        rank, tokens, read, kv_heads = results.get(timeout=60)
        out[rank] = (tokens, read, kv_heads)
    return out


@pytest.mark.parametrize(
    "variant",
    ["qwen3_moe", "qwen3_moe_mqa", "qwen3_moe_mixed", "llama", "deepseek_v3", "deepseek_v3_plain"],
)
def test_two_ranks_generate_the_single_process_tokens(variant, checkpoint):
    path = str(checkpoint(variant))
    loaded = load_model(path, dtype="float32")
    expected = generate(LLMEngine(config(path), model=loaded.model, model_config=loaded.config))
    full_read = loaded.bytes_read
    ranks = run_tensor_parallel(path)
    for rank, (tokens, read, kv_heads) in ranks.items():
        assert tokens == expected, f"rank {rank}"
        # Each rank read its slices, not the whole checkpoint (embeddings and norms are
        # replicated, so a little over half).
        assert read < 0.8 * full_read, (rank, read, full_read)
        # GQA splits its KV heads (or shares one); MLA keeps its one latent "head" whole.
        kv = loaded.config.num_kv_heads
        assert kv_heads == (kv if loaded.config.kv_shared else max(1, kv // WORLD))


def test_what_tensor_parallelism_does_not_combine_with_yet_is_refused(checkpoint):
    path = str(checkpoint("qwen3_moe"))
    settings = config(path)
    settings.speculative_method = "mtp"
    with pytest.raises(EngineConfigError, match="with tensor parallelism is not supported"):
        LLMEngine(settings, tp=TPGroup(0, 2))
    # A rank's shard builds without its peers (no collective runs before the first step).
    shard = LLMEngine(config(path), tp=TPGroup(0, 2))
    with pytest.raises(RequestError, match="with tensor parallelism is not supported"):
        shard.add_request(PROMPTS[0], params(IGNORE_EOS), export_kv_from=0)
    assert shard.reserve_kv("r", PROMPTS[0]) is None  # disaggregated requests prefill here


def test_models_that_do_not_split_say_why(checkpoint):
    with pytest.raises(TensorParallelError, match="num_attention_heads = 4 does not divide"):
        load_model(checkpoint("qwen3_moe"), dtype="float32", tp=TPGroup(0, 3))


@pytest.mark.parametrize("variant", ["qwen3_moe", "deepseek_v3"])
def test_expert_parallel_ranks_generate_the_single_process_tokens(variant, checkpoint):
    """EP=2 inside TP=2: each rank holds half the experts whole (and half of every dense
    matrix); the layer's all-reduce combines the two halves of the routed sum."""
    path = str(checkpoint(variant))
    loaded = load_model(path, dtype="float32")
    expected = generate(LLMEngine(config(path), model=loaded.model, model_config=loaded.config))
    ranks = run_tensor_parallel(path, ep_size=WORLD)
    for rank, (tokens, read, _) in ranks.items():
        assert tokens == expected, f"rank {rank}"
        assert read < 0.8 * loaded.bytes_read, (rank, read, loaded.bytes_read)
    sharded = load_model(path, dtype="float32", tp=TPGroup(1, WORLD, ep_size=WORLD))
    experts = [m for m in sharded.model.modules() if getattr(m, "local_slots", None)]
    full = loaded.model.config.num_experts
    assert experts and all(m.local_slots == (full // 2, full // 2) for m in experts)
    assert all(m.w13.shape[0] == full // 2 for m in experts)


def _eplb_rank(rank: int, path: str, port: int, results: Any) -> None:
    with joined(rank, port):
        settings = config(path)
        settings.ep_num_redundant_experts = 2  # 8 experts in 10 slots, 5 per rank
        settings.eplb_rebalance_interval = 3  # several rebalances inside one generation
        llm = LLMEngine(settings, tp=TPGroup(rank, WORLD, ep_size=WORLD))
        tokens = generate(llm)
        balancer = llm.balancer
        assert balancer is not None
        results.put(
            (
                rank,
                tokens,
                balancer.rebalances,
                balancer.experts_moved,
                tuple(map(tuple, balancer.placement.phy2log.tolist())),
                llm.stats.expert_imbalance,
            )
        )


def test_live_expert_rebalancing_mid_generation_leaves_the_tokens_unchanged(checkpoint):
    """EP=2 with two redundant expert slots, rebalanced every 3 forward passes while the
    batch generates: experts move between slots and ranks, the tokens stay those of the
    single-process engine, and both ranks agree on every placement without messages."""
    path = str(checkpoint("qwen3_moe"))
    loaded = load_model(path, dtype="float32")
    expected = generate(LLMEngine(config(path), model=loaded.model, model_config=loaded.config))
    context = mp.get_context("spawn")
    results = context.Queue()
    (port,) = free_ports(1)
    mp.start_processes(
        _eplb_rank, args=(path, port, results), nprocs=WORLD, join=True, start_method="spawn"
    )
    ranks = dict((r[0], r[1:]) for r in (results.get(timeout=60) for _ in range(WORLD)))
    placements = set()
    for rank, (tokens, rebalances, moved, phy2log, imbalance) in ranks.items():
        assert tokens == expected, f"rank {rank}"
        assert rebalances >= 3 and moved > 0, (rank, rebalances, moved)
        assert 1.0 <= imbalance < 2.0
        placements.add(str(phy2log))
    assert len(placements) == 1  # the same placement, computed apart on each rank
    trivial = [i % 8 for i in range(10)]
    assert any(layer != trivial for layer in eval(placements.pop()))


# Uneven on purpose: rank 0 serves three requests, rank 1 one short request, which finishes
# first; rank 1 then keeps joining the MLP collectives with no tokens while rank 0 goes on.
DP_SHARES = {0: [0, 1, 2], 1: [3]}
SHORT = 4  # rank 1's request's max_tokens


def _dp_rank(rank: int, path: str, port: int, results: Any, ep_size: int) -> None:
    with joined(rank, port):
        tp = TPGroup(rank, WORLD, ep_size=ep_size, dp_attention=True)
        llm = LLMEngine(config(path), tp=tp)
        mine = DP_SHARES[rank]
        cap = {} if rank == 0 else {"max_tokens": SHORT, "min_tokens": SHORT}
        rids = [llm.add_request(PROMPTS[i], params(MODES[i], **cap)) for i in mine]
        tokens: dict[str, list[int]] = {rid: [] for rid in rids}
        steps = idle = 0
        while True:
            # Every rank steps while any rank has work (the collectives need them all).
            busy = torch.tensor([int(llm.has_unfinished_requests())])
            dist.all_reduce(busy)
            if not busy.item():
                break
            idle += not llm.has_unfinished_requests()
            steps += 1
            for out in llm.step():
                tokens[out.request_id].extend(out.new_token_ids)
        assert_no_leaked_pages(llm)
        results.put((rank, [tokens[rid] for rid in rids], steps, idle))


@pytest.mark.parametrize(
    ("variant", "ep_size"),
    [("qwen3_moe", 1), ("deepseek_v3", 1), ("deepseek_v3", WORLD)],
    ids=["qwen3_moe", "deepseek_v3", "deepseek_v3-ep2"],
)
def test_dp_attention_ranks_serve_their_own_requests_with_the_single_process_tokens(
    variant, ep_size, checkpoint
):
    """DP attention over 2 ranks: each runs attention (GQA, or MLA with its latent cache)
    whole on its own requests and KV; their tokens meet for the split MLP / MoE (with expert
    parallelism too). Each request gets the single-process engine's tokens, including while
    the other rank is idle."""
    path = str(checkpoint(variant))
    loaded = load_model(path, dtype="float32")
    expected = generate(LLMEngine(config(path), model=loaded.model, model_config=loaded.config))
    context = mp.get_context("spawn")
    results = context.Queue()
    (port,) = free_ports(1)
    mp.start_processes(
        _dp_rank, args=(path, port, results, ep_size), nprocs=WORLD, join=True, start_method="spawn"
    )
    ranks = dict((r[0], r[1:]) for r in (results.get(timeout=60) for _ in range(WORLD)))
    assert ranks[0][0] == [expected[i] for i in DP_SHARES[0]]
    assert ranks[1][0] == [expected[3][:SHORT]]
    assert ranks[0][1] == ranks[1][1]  # they stepped together
    assert ranks[1][2] > 0 and ranks[0][2] == 0  # rank 1 idled while rank 0 went on


def node_engine_tokens(state: Any, path: str) -> list[list[int]]:
    """One rank of a multi-node launch: the engine over this rank's shard, the test prompts."""
    return generate(LLMEngine(config(path), tp=engine_group(state)))


# What each node (pod) runs: its ranks joining the rendezvous at the first node's address.
NODE_SCRIPT = """
import json, sys
from bisllm_server.engine.parallel.launch import node_main
from bisllm_server.engine.parallel.state import ParallelConfig
from test_tensor_parallel import node_engine_tokens

node_rank, port, path, ep = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
config = ParallelConfig(tp_size=2, ep_size=ep, node_count=2)
results = node_main(
    node_engine_tokens, config, node_rank=node_rank, master_addr="127.0.0.1",
    master_port=port, args=(path,), timeout_s=240.0, dist_timeout_s=120.0,
)
print("RESULTS " + json.dumps(results), flush=True)
"""


@pytest.mark.parametrize("ep_size", [1, WORLD], ids=["tp2", "tp2-ep2"])
def test_a_two_node_launch_over_loopback_serves_the_single_process_tokens(ep_size, checkpoint):
    """Two "nodes" (separate OS processes, one rank each, the rendezvous on the first's
    address over loopback) run a TP=2 engine of DeepSeek-V3 (with EP=2 too)."""
    path = str(checkpoint("deepseek_v3"))
    loaded = load_model(path, dtype="float32")
    expected = generate(LLMEngine(config(path), model=loaded.model, model_config=loaded.config))
    (port,) = free_ports(1)
    env = dict(os.environ)
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH")) if p)
    nodes = [
        subprocess.Popen(
            [sys.executable, "-c", NODE_SCRIPT, str(n), str(port), path, str(ep_size)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    try:
        for node in nodes:
            out, err = node.communicate(timeout=300)
            assert node.returncode == 0, err[-3000:]
            line = next(x for x in out.splitlines() if x.startswith("RESULTS "))
            (tokens,) = json.loads(line.removeprefix("RESULTS "))  # its one rank's
            assert tokens == expected
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait(timeout=10)
