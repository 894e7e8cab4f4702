"""Expert-parallel load balancing: placements even out skewed expert loads, keep their tables
consistent (and groups on their node), dispatch tokens only to replicas of the routed expert,
and the load recorder counts exactly the last `window` passes."""

from __future__ import annotations

import pytest
import torch

from bisllm_server.engine.parallel.eplb import (
    ExpertLoadRecorder,
    ExpertPlacement,
    map_to_physical,
    placement_from_phy2log,
    rebalance,
)

# The hierarchical case of the brief: 64 experts in 8 groups, 2 nodes of 4 ranks, 16 spare slots.
LAYERS, EXPERTS, GROUPS, NODES, RANKS, REDUNDANT = 6, 64, 8, 2, 8, 16
PHYSICAL = EXPERTS + REDUNDANT

POLICIES = {
    "global": {"num_groups": 1, "num_nodes": 1},
    "hierarchical": {"num_groups": GROUPS, "num_nodes": NODES},
}


def zipf_load(
    layers: int, experts: int, *, exponent: float, tokens: int, seed: int
) -> torch.Tensor:
    """Token counts [layers, experts]: Zipf popularity, shuffled per layer so each layer has its
    own hot experts, sampled as `tokens` routed tokens (so counts carry sampling noise)."""
    gen = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** exponent
    rows = []
    for _ in range(layers):
        probs = popularity[torch.randperm(experts, generator=gen)]
        ids = torch.multinomial(probs, tokens, replacement=True, generator=gen)
        rows.append(torch.bincount(ids, minlength=experts))
    return torch.stack(rows)


def assert_consistent(placement: ExpertPlacement, num_logical: int) -> None:
    """Every table agrees with the others, and the rank-major layout holds."""
    phy2log, log2phy, logcnt = placement.phy2log, placement.log2phy, placement.logcnt
    layers, slots = phy2log.shape
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert log2phy.shape == (layers, num_logical, slots - num_logical + 1)  # fixed per sizes
    assert ((phy2log >= 0) & (phy2log < num_logical)).all()
    assert placement.slots_per_rank * placement.num_ranks == slots == placement.num_physical
    assert (logcnt >= 1).all()
    assert int(logcnt.sum(1).unique().item()) == slots
    for layer in range(layers):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=num_logical), logcnt[layer])
        seen = []
        for expert in range(num_logical):
            row = log2phy[layer, expert]
            count = int(logcnt[layer, expert])
            assert (row[:count] >= 0).all() and (row[count:] == -1).all()
            assert (phy2log[layer, row[:count]] == expert).all()
            seen.extend(row[:count].tolist())
        assert sorted(seen) == list(range(slots))  # each slot listed once, under its own expert


def test_rebalance_lowers_imbalance_on_zipf_load():
    load = zipf_load(LAYERS, EXPERTS, exponent=1.0, tokens=20_000, seed=0)
    trivial = ExpertPlacement.trivial(LAYERS, EXPERTS, RANKS, num_redundant=REDUNDANT)
    before = trivial.imbalance(load)
    print(f"trivial imbalance per layer: {[round(x, 3) for x in before.tolist()]}")
    assert before.mean() >= 1.5
    for name, policy in POLICIES.items():
        placement = rebalance(load, num_physical=PHYSICAL, num_ranks=RANKS, **policy)
        after = placement.imbalance(load)
        print(f"{name} imbalance per layer: {[round(x, 3) for x in after.tolist()]}")
        assert after.max() <= 1.15, name
        assert (after < before).all(), name
        assert_consistent(placement, EXPERTS)


def test_rank_loads_conserve_tokens():
    load = zipf_load(LAYERS, EXPERTS, exponent=0.8, tokens=5_000, seed=1)
    placement = rebalance(load, num_physical=PHYSICAL, num_ranks=RANKS, **POLICIES["hierarchical"])
    rank_loads = placement.rank_loads(load)
    assert rank_loads.shape == (LAYERS, RANKS)
    torch.testing.assert_close(rank_loads.sum(1), load.sum(1).double())


def test_hot_expert_gets_the_spare_slots():
    load = torch.ones(1, 8)
    load[0, 5] = 100.0
    placement = rebalance(load, num_physical=12, num_groups=1, num_nodes=1, num_ranks=4)
    assert placement.logcnt[0].tolist() == [1, 1, 1, 1, 1, 5, 1, 1]
    # Five copies of one expert on four ranks: at most two share a rank.
    ranks = placement.log2phy[0, 5, :5] // placement.slots_per_rank
    assert torch.bincount(ranks, minlength=4).max() <= 2


@pytest.mark.parametrize(
    ("experts", "physical", "groups", "nodes", "ranks"),
    [
        (EXPERTS, PHYSICAL, GROUPS, NODES, RANKS),
        (EXPERTS, PHYSICAL, 1, 1, RANKS),
        (16, 24, 4, 4, 8),  # one group per node
        (12, 12, 3, 1, 4),  # no redundancy
        (8, 40, 2, 2, 2),  # many replicas per expert
        (64, 66, 8, 3, 6),  # 3 nodes do not divide 8 groups: global
    ],
)
def test_rebalance_tables_are_consistent(experts, physical, groups, nodes, ranks):
    load = zipf_load(3, experts, exponent=1.2, tokens=4_000, seed=experts + physical)
    placement = rebalance(
        load, num_physical=physical, num_groups=groups, num_nodes=nodes, num_ranks=ranks
    )
    assert placement.num_ranks == ranks
    assert placement.phy2log.shape == (3, physical)
    assert_consistent(placement, experts)


def test_hierarchical_keeps_each_group_on_one_node():
    load = zipf_load(LAYERS, EXPERTS, exponent=1.0, tokens=20_000, seed=2)
    placement = rebalance(load, num_physical=PHYSICAL, num_ranks=RANKS, **POLICIES["hierarchical"])
    slot_node = torch.arange(PHYSICAL) // (PHYSICAL // NODES)
    slot_group = placement.phy2log // (EXPERTS // GROUPS)
    for layer in range(LAYERS):
        node_of_group = {}
        for slot in range(PHYSICAL):
            group, node = int(slot_group[layer, slot]), int(slot_node[slot])
            assert node_of_group.setdefault(group, node) == node, (layer, group)
        assert len(node_of_group) == GROUPS
        groups_per_node = torch.bincount(torch.tensor(list(node_of_group.values())))
        assert groups_per_node.tolist() == [GROUPS // NODES] * NODES


def test_nodes_not_dividing_groups_falls_back_to_global():
    load = zipf_load(2, 64, exponent=1.0, tokens=4_000, seed=3)
    fallback = rebalance(load, num_physical=66, num_groups=8, num_nodes=3, num_ranks=6)
    plain = rebalance(load, num_physical=66, num_groups=1, num_nodes=1, num_ranks=6)
    assert torch.equal(fallback.phy2log, plain.phy2log)


def test_rebalance_is_deterministic_on_ties():
    load = torch.full((2, 16), 7)  # every comparison is a tie
    first = rebalance(load, num_physical=24, num_groups=4, num_nodes=2, num_ranks=4)
    second = rebalance(load.clone(), num_physical=24, num_groups=4, num_nodes=2, num_ranks=4)
    assert torch.equal(first.phy2log, second.phy2log)
    assert torch.equal(first.phy2log[0], first.phy2log[1])


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_uniform_load_without_redundancy_is_balanced(policy):
    load = torch.full((3, EXPERTS), 250)
    placement = rebalance(load, num_physical=EXPERTS, num_ranks=RANKS, **POLICIES[policy])
    assert (placement.logcnt == 1).all()
    assert (placement.imbalance(load) == 1.0).all()


def test_imbalance_of_an_idle_layer_is_one():
    placement = ExpertPlacement.trivial(2, 8, 4)
    load = torch.zeros(2, 8)
    load[1, 0] = 10
    assert placement.imbalance(load).tolist() == [1.0, 4.0]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_physical": 60}, "num_physical"),  # fewer slots than experts
        ({"num_physical": 81}, "num_ranks"),  # 81 slots on 8 ranks
        ({"num_nodes": 3}, "num_nodes"),  # 8 ranks on 3 nodes
        ({"num_groups": 7, "num_nodes": 1}, "num_groups"),  # 64 experts in 7 groups
        ({"num_ranks": 0}, "num_ranks"),
    ],
)
def test_rebalance_argument_errors_name_the_argument(kwargs, argument):
    arguments = {"num_physical": PHYSICAL, "num_groups": GROUPS, "num_nodes": NODES}
    arguments["num_ranks"] = RANKS
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        rebalance(torch.ones(2, EXPERTS), **arguments)


def test_rebalance_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight"):
        rebalance(torch.ones(EXPERTS), num_physical=64, num_groups=1, num_nodes=1, num_ranks=8)
    with pytest.raises(ValueError, match="weight"):
        rebalance(-torch.ones(1, 8), num_physical=8, num_groups=1, num_nodes=1, num_ranks=8)


def test_trivial_layout_and_its_error():
    placement = ExpertPlacement.trivial(2, 6, 4, num_redundant=2)
    assert placement.phy2log[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert placement.logcnt[0].tolist() == [2, 2, 1, 1, 1, 1]
    assert placement.log2phy[0, 0].tolist() == [0, 6, -1]
    assert placement.log2phy[0, 3].tolist() == [3, -1, -1]
    assert placement.slots_per_rank == 2
    assert_consistent(placement, 6)
    with pytest.raises(ValueError, match="num_ranks"):
        ExpertPlacement.trivial(2, 6, 4, num_redundant=1)


def test_placement_from_phy2log_needs_every_expert():
    with pytest.raises(ValueError, match="at least one"):
        placement_from_phy2log(torch.tensor([[0, 0, 1, 1]]), 3, 2)


@pytest.fixture(scope="module")
def replicated() -> ExpertPlacement:
    load = zipf_load(2, 16, exponent=1.2, tokens=4_000, seed=4)
    return rebalance(load, num_physical=32, num_groups=4, num_nodes=2, num_ranks=8)


def test_map_to_physical_returns_replicas_of_the_routed_expert(replicated):
    gen = torch.Generator().manual_seed(5)
    topk_ids = torch.randint(0, 16, (64, 4), generator=gen)
    for layer in range(2):
        choices = [
            map_to_physical(topk_ids, replicated, layer),
            map_to_physical(topk_ids, replicated, layer, generator=gen),
            *(map_to_physical(topk_ids, replicated, layer, rank=r) for r in range(8)),
        ]
        for physical in choices:
            assert physical.shape == topk_ids.shape and physical.dtype == torch.int64
            assert torch.equal(replicated.phy2log[layer, physical], topk_ids)


def test_static_dispatch_prefers_a_replica_on_the_same_rank(replicated):
    every_expert = torch.arange(16)
    local_hits = 0
    for rank in range(8):
        physical = map_to_physical(every_expert, replicated, 1, rank=rank)
        for expert in range(16):
            replicas = replicated.log2phy[1, expert, : int(replicated.logcnt[1, expert])]
            on_rank = replicas[replicas // replicated.slots_per_rank == rank]
            if len(on_rank):
                local_hits += 1
                assert int(physical[expert]) in on_rank.tolist()
            else:
                assert int(physical[expert]) == int(replicas[0])
    # Both branches ran: each rank holds some experts and lacks others.
    per_rank = replicated.phy2log[1].view(8, replicated.slots_per_rank)
    assert local_hits == sum(len(row.unique()) for row in per_rank) < 8 * 16


def test_dynamic_dispatch_spreads_tokens_over_all_replicas():
    placement = ExpertPlacement.trivial(1, 4, 4, num_redundant=8)  # three copies of each expert
    draws = 30_000
    topk_ids = torch.zeros(draws, dtype=torch.int64)
    physical = map_to_physical(topk_ids, placement, 0, generator=torch.Generator().manual_seed(6))
    counts = torch.bincount(physical, minlength=12)[placement.log2phy[0, 0, :3]].double()
    expected = draws / 3
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 13.8, counts  # the 0.1% tail of chi-square with 2 degrees of freedom
    again = map_to_physical(topk_ids, placement, 0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(physical, again)  # a seeded generator reproduces the draw


# The tables on the device the routed ids live on (cuda only where a GPU is lent).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_map_to_physical_on_the_device_matches_the_cpu(replicated, device):
    on_device = replicated.to(device)
    topk_ids = torch.randint(0, 16, (128, 8), generator=torch.Generator().manual_seed(8))
    for rank in (None, 3):
        expected = map_to_physical(topk_ids, replicated, 1, rank=rank)
        got = map_to_physical(topk_ids.to(device), on_device, 1, rank=rank)
        assert got.device.type == device and torch.equal(got.cpu(), expected)
    gen = torch.Generator(device=device).manual_seed(9)
    dynamic = map_to_physical(topk_ids.to(device), on_device, 1, generator=gen)
    assert torch.equal(replicated.phy2log[1, dynamic.cpu()], topk_ids)
    ones = torch.ones(2, 16)
    assert torch.equal(on_device.imbalance(ones.to(device)).cpu(), replicated.imbalance(ones))


def test_map_to_physical_argument_errors(replicated):
    ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="not both"):
        map_to_physical(ids, replicated, 0, rank=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="layer"):
        map_to_physical(ids, replicated, 2)
    with pytest.raises(ValueError, match="rank"):
        map_to_physical(ids, replicated, 0, rank=8)


def test_recorder_counts_match_bincount():
    recorder = ExpertLoadRecorder(num_layers=3, num_logical=10, window=4)
    gen = torch.Generator().manual_seed(7)
    expected = torch.zeros(3, 10, dtype=torch.int64)
    for _ in range(2):
        for layer in range(3):
            ids = torch.randint(0, 10, (32, 2), generator=gen)
            recorder.record(layer, ids)
            expected[layer] += torch.bincount(ids.flatten(), minlength=10)
        recorder.step()
    assert torch.equal(recorder.load(), expected)
    assert recorder.num_passes == 2


def test_recorder_window_forgets_old_passes():
    recorder = ExpertLoadRecorder(num_layers=1, num_logical=6, window=3)
    for expert in range(5):  # pass i routes i + 1 tokens to expert i
        recorder.record(0, torch.full((expert + 1,), expert))
        recorder.step()
    assert recorder.load()[0].tolist() == [0, 0, 3, 4, 5, 0]
    recorder.record(0, torch.tensor([5, 5, -1]))  # the open pass counts only once closed
    assert recorder.load()[0].tolist() == [0, 0, 3, 4, 5, 0]
    recorder.step()
    assert recorder.load()[0].tolist() == [0, 0, 0, 4, 5, 2]  # -1 (padding) is ignored
    recorder.reset()
    assert recorder.load().sum() == 0 and recorder.num_passes == 0


def test_recorder_rejects_bad_ids_and_layers():
    recorder = ExpertLoadRecorder(num_layers=2, num_logical=4, window=2)
    with pytest.raises(ValueError, match="num_logical"):
        recorder.record(0, torch.tensor([4]))
    with pytest.raises(ValueError, match="layer"):
        recorder.record(2, torch.tensor([0]))
