"""Tensor parallelism on torch.distributed with gloo: two processes, each an engine over its
shard of the model, fed the same requests, produce exactly the greedy tokens of the
single-process engine. The variants cover GQA heads split across ranks, one KV head shared
by both ranks, dense and MoE layers with a tied head, row-parallel biases, and DeepSeek-V3's
MLA heads (latent cache whole on each rank) with grouped routing and shared experts. Each
rank reads only its slices of the checkpoint. Under DP attention with whole experts per rank
the experts exchange each rank's own tokens by all-to-all (`TPGroup.moe_all_to_all`)."""

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
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.layers.mlp import SwiGLUMLP
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
    LLMEngine(config(path), tp=TPGroup(0, 2))


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe_mixed"])  # untied, tied head
def test_each_rank_holds_its_share_of_the_vocabulary(variant, checkpoint):
    """The embedding (and so a tied head) and the head are split by vocabulary rows: rank 1
    holds the second half, read from the checkpoint, and no rank holds vocab x hidden."""
    path = str(checkpoint(variant))
    whole = load_model(path, dtype="float32").model
    shard = load_model(path, dtype="float32", tp=TPGroup(1, 2)).model  # no collective to load
    vocab = whole.config.vocab_size
    embed = shard.model.embed_tokens.weight
    assert embed.shape[0] == vocab // 2
    torch.testing.assert_close(embed, whole.model.embed_tokens.weight[vocab // 2 :])
    torch.testing.assert_close(shard.head_weight, whole.head_weight[vocab // 2 :])


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


def serve_dp_share(llm: LLMEngine, rank: int) -> tuple[list[list[int]], int, int]:
    """This rank's share of the requests (DP_SHARES), stepped while any rank has work: the
    tokens of each, the steps taken, and how many of them this rank idled through."""
    cap = {} if rank == 0 else {"max_tokens": SHORT, "min_tokens": SHORT}
    rids = [llm.add_request(PROMPTS[i], params(MODES[i], **cap)) for i in DP_SHARES[rank]]
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
    return [tokens[rid] for rid in rids], steps, idle


def mlp_widths(model: Any) -> list[int]:
    """The gate/up width of every dense MLP and shared expert: whole, or this rank's share."""
    return [m.gate_up_proj.out_features for m in model.modules() if isinstance(m, SwiGLUMLP)]


def _dp_rank(rank: int, path: str, port: int, results: Any, ep_size: int) -> None:
    with joined(rank, port):
        tp = TPGroup(rank, WORLD, ep_size=ep_size, dp_attention=True)
        llm = LLMEngine(config(path), tp=tp)
        tokens, steps, idle = serve_dp_share(llm, rank)
        widths = mlp_widths(llm.runner.model)
        results.put((rank, tokens, steps, idle, dict(tp.calls), widths))


def run_dp(fn: Any, path: str, *args: Any) -> dict[int, tuple[Any, ...]]:
    """`fn(rank, path, port, results, *args)` on WORLD spawned ranks: rank -> its result."""
    context = mp.get_context("spawn")
    results = context.Queue()
    (port,) = free_ports(1)
    mp.start_processes(
        fn, args=(path, port, results, *args), nprocs=WORLD, join=True, start_method="spawn"
    )
    return dict((r[0], r[1:]) for r in (results.get(timeout=60) for _ in range(WORLD)))


@pytest.mark.parametrize(
    ("variant", "ep_size"),
    [("qwen3_moe", 1), ("deepseek_v3", 1), ("qwen3_moe", WORLD), ("deepseek_v3", WORLD)],
    ids=["qwen3_moe", "deepseek_v3", "qwen3_moe-ep2", "deepseek_v3-ep2"],
)
def test_dp_attention_ranks_serve_their_own_requests_with_the_single_process_tokens(
    variant, ep_size, checkpoint
):
    """DP attention over 2 ranks: each runs attention (GQA, or MLA with its latent cache)
    whole on its own requests and KV. Without expert parallelism their tokens meet for the
    split MLP / MoE (gathered, then all-reduced); with EP=2 (whole experts per rank) each
    rank sends only its own tokens' (token, expert) pairs to the experts' ranks and back by
    all-to-all, with dense MLPs and shared experts whole on every rank. Each request gets the
    single-process engine's tokens, including while the other rank is idle."""
    path = str(checkpoint(variant))
    loaded = load_model(path, dtype="float32")
    expected = generate(LLMEngine(config(path), model=loaded.model, model_config=loaded.config))
    ranks = run_dp(_dp_rank, path, ep_size)
    assert ranks[0][0] == [expected[i] for i in DP_SHARES[0]]
    assert ranks[1][0] == [expected[3][:SHORT]]
    assert ranks[0][1] == ranks[1][1]  # they stepped together
    assert ranks[1][2] > 0 and ranks[0][2] == 0  # rank 1 idled while rank 0 went on
    whole = mlp_widths(loaded.model)
    for rank, (*_, calls, widths) in ranks.items():
        if ep_size == WORLD:  # the all-to-all path, and nothing of the gather path
            assert calls.get("all_to_all", 0) > 0, (rank, calls)
            assert "gather_tokens" not in calls and "all_reduce" not in calls, (rank, calls)
            assert widths == whole  # dense MLPs and shared experts replicated whole
        else:
            assert calls.get("gather_tokens", 0) > 0 and "all_to_all" not in calls, calls
            assert widths == [w // WORLD for w in whole]
    # Both ranks made the same exchanges, the idle one with no tokens.
    assert ranks[0][-2] == ranks[1][-2]


def test_all_to_all_expert_parallel_is_dp_attention_with_whole_experts_per_rank(checkpoint):
    """The mode is on only where each rank holds whole experts and its own tokens; there the
    dense MLPs and shared experts load whole, and the experts each rank's half."""
    assert TPGroup(0, 2, ep_size=2, dp_attention=True).moe_all_to_all
    assert not TPGroup(0, 2, ep_size=2).moe_all_to_all  # same tokens everywhere: all-reduce
    assert not TPGroup(0, 2, dp_attention=True).moe_all_to_all  # experts split by columns
    assert not TPGroup(0, 4, ep_size=2, dp_attention=True).moe_all_to_all
    assert not TPGroup().moe_all_to_all
    path = str(checkpoint("deepseek_v3"))
    whole = load_model(path, dtype="float32").model
    tp = TPGroup(1, WORLD, ep_size=WORLD, dp_attention=True)
    shard = load_model(path, dtype="float32", tp=tp).model  # loads without its peer
    dense = {n: m for n, m in whole.named_modules() if isinstance(m, SwiGLUMLP)}
    assert dense and set(dense) == {n for n, m in shard.named_modules() if isinstance(m, SwiGLUMLP)}
    for name, module in shard.named_modules():
        if isinstance(module, SwiGLUMLP):
            for pname, param in module.named_parameters():
                assert torch.equal(param, dense[name].get_parameter(pname)), (name, pname)
        elif getattr(module, "local_slots", None):
            assert module.dispatch_group is tp and module.local_slots == (4, 4)
            assert torch.equal(module.w13, whole.get_submodule(name).w13[4:])
    assert not tp.calls  # nothing exchanged while loading


def _a2a_layer_rank(rank: int, path: str, port: int, results: Any, paths: list[str]) -> None:
    """Every MLP / MoE layer under all-to-all EP against the whole single-process layer, on
    uneven random tokens per rank (none at all on one rank in some rounds), in fp32 and bf16."""
    with joined(rank, port):
        errors = []
        rounds = [(5, 0), (3, 9), (0, 2), (0, 0)]  # tokens on (rank 0, rank 1)
        for variant_path in [path, *paths]:
            for dtype in (torch.float32, torch.bfloat16):
                tp = TPGroup(rank, WORLD, ep_size=WORLD, dp_attention=True)
                whole = load_model(variant_path, dtype=dtype).model
                shard = load_model(variant_path, dtype=dtype, tp=tp, num_redundant_experts=2)
                gen = torch.Generator().manual_seed(rank)
                worst = 0.0
                for counts in rounds:
                    x = torch.randn(counts[rank], whole.config.hidden_size, generator=gen)
                    x = x.to(dtype)
                    for mine, ref in zip(shard.model.model.layers, whole.model.layers, strict=True):
                        got, want = mine.feed_forward(x), ref.mlp(x)
                        assert got.dtype == want.dtype == dtype and got.shape == want.shape
                        if want.numel():
                            scale = float(want.abs().max())
                            worst = max(worst, float((got - want).abs().max()) / scale)
                errors.append((Path(variant_path).name, str(dtype), worst, dict(tp.calls)))
        results.put((rank, errors))


def test_all_to_all_expert_layers_match_the_whole_layer_in_fp32_and_bf16(checkpoint):
    """Layer by layer (dense, MoE with and without shared experts, grouped routing, two
    redundant slots), on uneven tokens per rank including none: all-to-all EP computes what
    the whole layer computes, to rounding, in fp32 and bf16."""
    paths = [str(checkpoint("qwen3_moe")), str(checkpoint("deepseek_v3"))]
    ranks = run_dp(_a2a_layer_rank, paths[0], paths[1:])
    for rank, (errors,) in ranks.items():
        for name, dtype, worst, calls in errors:
            bound = 1e-5 if dtype == "torch.float32" else 2e-2
            assert worst < bound, (rank, name, dtype, worst)
            assert calls.get("all_to_all", 0) > 0 and "gather_tokens" not in calls, calls
    assert [e[3] for e in ranks[0][0]] == [e[3] for e in ranks[1][0]]  # in step


def _dp_eplb_rank(rank: int, path: str, port: int, results: Any) -> None:
    with joined(rank, port):
        settings = config(path)
        settings.ep_num_redundant_experts = 2  # 8 experts in 10 slots, 5 per rank
        settings.eplb_rebalance_interval = 3
        tp = TPGroup(rank, WORLD, ep_size=WORLD, dp_attention=True)
        llm = LLMEngine(settings, tp=tp)
        balancer = llm.balancer
        assert balancer is not None
        local: list[int] = []  # this rank's own routed pairs in each rebalanced window
        placements: list[list[list[int]]] = []
        rebalance = balancer.rebalance

        def spy() -> None:
            local.append(int(balancer.recorder.load().sum()))
            rebalance()
            placements.append(balancer.placement.phy2log.tolist())

        balancer.rebalance = spy  # type: ignore[method-assign]
        tokens, _, _ = serve_dp_share(llm, rank)
        results.put(
            (
                rank,
                tokens,
                balancer.rebalances,
                balancer.experts_moved,
                placements,
                local,
                llm.stats.expert_imbalance,
                dict(tp.calls),
            )
        )


def test_live_expert_rebalancing_under_dp_attention_all_to_all(checkpoint):
    """DP attention + all-to-all EP=2 with two redundant slots, rebalanced every 3 passes
    while the ranks serve different loads (rank 0 three requests, rank 1 one short one, then
    nothing): each rank records only its own tokens, the window's counts are summed over the
    ranks before balancing, so both compute the same placements; experts move mid-generation
    and the tokens stay the single-process engine's."""
    path = str(checkpoint("qwen3_moe"))
    loaded = load_model(path, dtype="float32")
    expected = generate(LLMEngine(config(path), model=loaded.model, model_config=loaded.config))
    ranks = run_dp(_dp_eplb_rank, path)
    assert ranks[0][0] == [expected[i] for i in DP_SHARES[0]]
    assert ranks[1][0] == [expected[3][:SHORT]]
    (_, rebalances0, _, placements0, local0, *_), (_, rebalances1, _, placements1, local1, *_) = (
        ranks[0],
        ranks[1],
    )
    assert rebalances0 == rebalances1 >= 3
    assert placements0 == placements1  # the same placement every time, computed apart
    assert local0 != local1 and local1[-1] == 0 < local0[-1]  # the ranks counted differently
    assert sum(r[2] for r in ranks.values()) > 0  # experts moved
    trivial = [i % 8 for i in range(10)]
    assert any(layer != trivial for layer in placements0[-1])
    for rank, (*_, imbalance, calls) in ranks.items():
        assert 1.0 <= imbalance < 2.0, rank
        assert calls.get("all_to_all", 0) > 0 and "gather_tokens" not in calls, calls
        assert calls["all_reduce"] == len(local0)  # only the counts' sum, once per window


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
