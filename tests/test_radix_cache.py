"""Radix prefix cache: matching, splitting, page ownership, locking, LRU eviction and the KV
events a router mirrors the cache from. Ends with a hypothesis state machine that drives the
cache the way the scheduler does and checks the page accounting after every step."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bisllm_server.engine.kv_cache import PageAllocator
from bisllm_server.engine.radix_cache import RadixCache, RadixNode
from bisllm_server.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventPublisher,
    event_from_dict,
    hash_block,
    hash_token_blocks,
)


class Mirror:
    """What a KV-aware router keeps: block hash -> parent hash, built only from events."""

    def __init__(self) -> None:
        self.parent: dict[int, int | None] = {}
        self.events: list[KVEvent] = []

    def __call__(self, event: KVEvent) -> None:
        # Go through the wire format, as the router in another process would.
        event = event_from_dict(json.loads(json.dumps(event.to_dict())))
        self.events.append(event)
        if isinstance(event, BlockStored):
            parent = event.parent_block_hash
            assert parent is None or parent in self.parent, "stored under an unknown parent"
            # The router re-hashes tokens itself; it must land on the engine's ids.
            assert event.block_hashes == hash_token_blocks(
                event.token_ids, event.block_size, parent
            )
            for h in event.block_hashes:
                assert h not in self.parent, "block stored twice"
                self.parent[h] = parent
                parent = h
        elif isinstance(event, BlockRemoved):
            for h in event.block_hashes:
                del self.parent[h]
            gone = set(event.block_hashes)
            assert not any(p in gone for p in self.parent.values()), "removed a non-leaf block"
        else:
            self.parent.clear()

    def prefix_blocks(self, token_ids: list[int], block_size: int) -> int:
        """How many leading blocks of a prompt the router believes are cached."""
        n = 0
        for h in hash_token_blocks(token_ids, block_size):
            if h not in self.parent:
                break
            n += 1
        return n


def make_cache(page_size: int = 2, num_pages: int = 32) -> tuple[RadixCache, PageAllocator, Mirror]:
    allocator = PageAllocator(num_pages)
    publisher = KVEventPublisher()
    mirror = Mirror()
    publisher.subscribe(mirror)
    return RadixCache(page_size, allocator, publisher), allocator, mirror


def alloc(allocator: PageAllocator, n: int) -> list[int]:
    pages = allocator.alloc(n)
    assert pages is not None
    return pages


def path_hashes(node: RadixNode) -> list[int]:
    hashes: list[int] = []
    while node.parent is not None:
        hashes[:0] = node.hashes
        node = node.parent
    return hashes


# ---- kv_events -------------------------------------------------------------------------------


def test_hash_is_stable_and_chained() -> None:
    # A fixed value: engines and routers in other processes and versions must agree on it.
    assert hash_block(None, [1, 2, 3]) == hash_block(None, (1, 2, 3)) == 8429715020502706630
    h0 = hash_block(None, [1, 2])
    assert hash_token_blocks([1, 2, 3, 4, 5], 2) == [h0, hash_block(h0, [3, 4])]
    assert hash_token_blocks([1], 2) == []
    assert hash_block(None, [1, 2]) != hash_block(0, [1, 2])  # "no parent" is not parent 0
    assert hash_block(None, [3, 4]) != hash_block(h0, [3, 4])  # position-aware
    assert all(0 <= h < 2**63 for h in hash_token_blocks(list(range(-50, 50)), 3))
    with pytest.raises(ValueError):
        hash_token_blocks([1], 0)


@pytest.mark.parametrize(
    "event",
    [
        BlockStored([1, 2], None, [5, 6, 7, 8], 2),
        BlockStored([3], 9, [1, 1], 2),
        BlockRemoved([1, 2]),
        AllBlocksCleared(),
    ],
)
def test_event_dict_round_trip(event: KVEvent) -> None:
    data = json.loads(json.dumps(event.to_dict()))
    assert data["type"] == type(event).__name__
    assert event_from_dict(data) == event


def test_event_from_dict_errors() -> None:
    with pytest.raises(ValueError, match="unknown"):
        event_from_dict({"type": "Nope"})
    with pytest.raises(ValueError, match="malformed"):
        event_from_dict({"type": "BlockRemoved"})


def test_publisher_subscribe_unsubscribe() -> None:
    pub = KVEventPublisher()
    got_a: list[KVEvent] = []
    got_b: list[KVEvent] = []
    unsub_a = pub.subscribe(got_a.append)
    pub.subscribe(got_b.append)
    assert pub.publish(AllBlocksCleared()) == 1
    unsub_a()
    unsub_a()  # idempotent
    assert pub.publish(BlockRemoved([1])) == 2
    assert pub.last_event_id == 2
    assert got_a == [AllBlocksCleared()]
    assert got_b == [AllBlocksCleared(), BlockRemoved([1])]


# ---- match / insert ----------------------------------------------------------------------------


def test_empty_cache_matches_nothing() -> None:
    cache, _, _ = make_cache()
    m = cache.match_prefix([1, 2, 3, 4])
    assert (m.pages, m.num_tokens, m.node) == ([], 0, cache.root)
    assert cache.insert([], []).node is cache.root


def test_insert_then_match_full_pages_only() -> None:
    cache, allocator, _ = make_cache()
    pages = alloc(allocator, 3)
    r = cache.insert([1, 2, 3, 4, 5, 6], pages)
    assert (r.pages, r.num_tokens) == (pages, 6)
    assert cache.cached_pages == cache.evictable_pages == 3
    assert cache.num_nodes == 1

    m = cache.match_prefix([1, 2, 3, 4, 5, 6, 7])  # the partial trailing page is ignored
    assert (m.pages, m.num_tokens, m.node) == (pages, 6, r.node)
    assert cache.match_prefix([1, 2, 3, 4, 5]).pages == pages[:2]
    assert cache.match_prefix([1, 9]).pages == []
    assert cache.match_prefix([1]).num_tokens == 0
    cache.check_invariants()


def test_match_inside_an_edge_splits_it() -> None:
    cache, allocator, _ = make_cache()
    pages = alloc(allocator, 4)
    leaf = cache.insert([1, 2, 3, 4, 5, 6, 7, 8], pages).node
    m = cache.match_prefix([1, 2, 3, 4, 5, 9])  # diverges inside the third page
    assert (m.pages, m.num_tokens) == (pages[:2], 4)
    assert m.node.key == (1, 2, 3, 4) and m.node.pages == pages[:2]
    assert leaf.parent is m.node and leaf.key == (5, 6, 7, 8)
    assert cache.num_nodes == 2 and cache.cached_pages == 4
    # The original leaf object still covers its own (now shorter) edge and the full match.
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).node is leaf
    cache.check_invariants()


def test_insert_frees_duplicate_pages_and_returns_canonical() -> None:
    cache, allocator, mirror = make_cache(num_pages=10)
    first = alloc(allocator, 2)
    cache.insert([1, 2, 3, 4], first)
    # Another request computed the same prefix into its own pages, plus one new page.
    second = alloc(allocator, 3)
    free_before = allocator.num_free
    r = cache.insert([1, 2, 3, 4, 5, 6], second)
    assert r.pages == [*first, second[2]]
    assert allocator.num_free == free_before + 2
    assert not allocator.is_allocated(second[0]) and not allocator.is_allocated(second[1])
    assert cache.cached_pages == 3
    assert allocator.num_free + cache.cached_pages == 10
    # Only the new page was announced, chained on the existing prefix.
    stored = [e for e in mirror.events if isinstance(e, BlockStored)]
    assert len(stored) == 2 and stored[1].token_ids == [5, 6]
    assert stored[1].parent_block_hash == stored[0].block_hashes[-1]
    cache.check_invariants()


def test_insert_with_own_prefix_pages_frees_nothing() -> None:
    cache, allocator, _ = make_cache(num_pages=10)
    prefix = alloc(allocator, 2)
    cache.insert([1, 2, 3, 4], prefix)
    m = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.lock(m.node)
    tail = alloc(allocator, 1)
    free_before = allocator.num_free
    r = cache.insert([1, 2, 3, 4, 5, 6], m.pages + tail)
    assert r.pages == prefix + tail and allocator.num_free == free_before
    cache.lock(r.node)
    cache.unlock(m.node)
    assert cache.protected_pages == 3 and cache.evictable_pages == 0
    cache.check_invariants()


def test_insert_rejects_bad_input() -> None:
    cache, allocator, _ = make_cache(num_pages=10)
    pages = alloc(allocator, 2)
    with pytest.raises(ValueError, match="page_size"):
        cache.insert([1, 2, 3], pages)
    cache.insert([1, 2, 3, 4], pages)
    with pytest.raises(ValueError, match="already belongs"):
        cache.insert([7, 8], [pages[0]])  # a cached page handed in again as new content
    with pytest.raises(ValueError, match="not allocated"):
        cache.insert([7, 8], [9])
    with pytest.raises(ValueError, match="twice"):
        mine = alloc(allocator, 1)
        cache.insert([7, 8, 9, 9], [mine[0], mine[0]])
    assert cache.cached_pages == 2
    cache.check_invariants()


# ---- locking / eviction -------------------------------------------------------------------------


def test_lock_moves_pages_between_counters() -> None:
    cache, allocator, _ = make_cache()
    cache.insert([1, 2, 3, 4], alloc(allocator, 2))
    prefix = cache.match_prefix([1, 2, 3, 4]).pages
    leaf = cache.insert([1, 2, 3, 4, 5, 6], [*prefix, *alloc(allocator, 1)]).node
    assert cache.num_nodes == 2
    cache.lock(leaf)
    cache.lock(leaf)
    assert (cache.protected_pages, cache.evictable_pages) == (3, 0)
    assert cache.evict(100) == 0
    cache.unlock(leaf)
    assert cache.protected_pages == 3
    cache.unlock(leaf)
    assert (cache.protected_pages, cache.evictable_pages) == (0, 3)
    with pytest.raises(RuntimeError, match="not locked"):
        cache.unlock(leaf)
    cache.lock(cache.root)  # the root is always locked: a no-op
    cache.unlock(cache.root)
    cache.check_invariants()


def test_locked_prefix_protects_ancestors_only() -> None:
    cache, allocator, _ = make_cache()
    a = cache.insert([1, 1, 2, 2], alloc(allocator, 2)).node
    cache.insert([1, 1, 3, 3], [*cache.match_prefix([1, 1]).pages, *alloc(allocator, 1)])
    shared = cache.match_prefix([1, 1]).node
    assert a.parent is shared
    cache.lock(a)
    assert cache.evict(100) == 1  # only the sibling branch [3, 3] can go
    assert cache.match_prefix([1, 1, 2, 2]).node is a
    assert (cache.protected_pages, cache.evictable_pages) == (2, 0)
    cache.check_invariants()


def test_evict_lru_order_and_parent_cascade() -> None:
    cache, allocator, mirror = make_cache(page_size=1, num_pages=16)
    ab = cache.insert([0, 1, 2], alloc(allocator, 3)).node  # [0] -> [1, 2]
    p = cache.match_prefix([0]).pages
    ac = cache.insert([0, 3], [*p, *alloc(allocator, 1)]).node  # split: [0] -> {[1, 2], [3]}
    x = cache.insert([5], alloc(allocator, 1)).node
    cache.match_prefix([0, 1, 2])  # refresh: order by age is now [3], [5], [0 1 2]
    assert cache.evict(1) == 1
    assert ac.parent is None and cache.match_prefix([0, 3]).num_tokens == 1
    assert cache.evict(1) == 1 and x.parent is None
    # Next: the whole leaf [1, 2] (more than asked), then its now-bare parent [0].
    assert cache.evict(1) == 2 and ab.parent is None
    assert cache.evict(5) == 1 and cache.num_nodes == 0
    assert allocator.num_free == 16 and cache.cached_pages == 0
    assert mirror.parent == {}
    removed = [e.block_hashes for e in mirror.events if isinstance(e, BlockRemoved)]
    assert removed == [
        hash_token_blocks([0, 3], 1)[1:],
        hash_token_blocks([5], 1),
        hash_token_blocks([0, 1, 2], 1)[1:],
        hash_token_blocks([0], 1),
    ]
    with pytest.raises(RuntimeError, match="evicted"):
        cache.lock(ab)
    cache.check_invariants()


def test_events_hash_chain_matches_router_hashing() -> None:
    cache, allocator, mirror = make_cache(page_size=2)
    tokens = [4, 4, 5, 5, 6, 6, 7]
    cache.insert(tokens[:6], alloc(allocator, 3))
    cache.match_prefix([4, 4, 5, 5, 9, 9])  # split: no event, hashes unchanged
    prefix = cache.match_prefix(tokens).pages[:2]
    node = cache.insert([4, 4, 5, 5, 8, 8], [*prefix, *alloc(allocator, 1)]).node
    assert path_hashes(node) == hash_token_blocks([4, 4, 5, 5, 8, 8], 2)
    assert set(mirror.parent) == cache.block_hashes()
    assert mirror.prefix_blocks(tokens, 2) == 3
    stored = mirror.events[0]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == hash_token_blocks(tokens, 2)
    assert (stored.parent_block_hash, stored.token_ids, stored.block_size) == (
        None,
        tokens[:6],
        2,
    )


def test_reset() -> None:
    cache, allocator, mirror = make_cache()
    m = cache.insert([1, 2, 3, 4], alloc(allocator, 2))
    cache.lock(m.node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(m.node)
    cache.reset()
    assert cache.cached_pages == cache.num_nodes == 0 and allocator.num_free == 32
    assert mirror.events[-1] == AllBlocksCleared() and mirror.parent == {}
    with pytest.raises(RuntimeError):
        cache.lock(m.node)
    cache.check_invariants()
    # Usable again afterwards.
    cache.insert([1, 2], alloc(allocator, 1))
    assert cache.match_prefix([1, 2]).num_tokens == 2


# ---- random operation sequences -----------------------------------------------------------------


@dataclass
class SimRequest:
    tokens: list[int]
    node: RadixNode  # locked for the request's lifetime
    shared: list[int]  # pages owned by the tree (locked prefix)
    own: list[int]  # pages only this request holds, not yet inserted


class CacheMachine(RuleBasedStateMachine):
    """Drives the cache like the scheduler: match+lock, allocate (evicting when short),
    insert finished or checkpointed sequences, abort, evict, reset."""

    PAGE_SIZE = 2
    NUM_PAGES = 12
    tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=12)

    def __init__(self) -> None:
        super().__init__()
        self.cache, self.allocator, self.mirror = make_cache(self.PAGE_SIZE, self.NUM_PAGES)
        self.requests: list[SimRequest] = []

    def _pop(self, idx: int) -> SimRequest:
        return self.requests.pop(idx % len(self.requests))

    @rule(tokens=tokens_st)
    def start(self, tokens: list[int]) -> None:
        ps = self.PAGE_SIZE
        m = self.cache.match_prefix(tokens)
        assert m.num_tokens == len(m.pages) * ps
        assert m.num_tokens // ps == self.mirror.prefix_blocks(tokens, ps)
        self.cache.lock(m.node)
        need = -(-len(tokens) // ps) - len(m.pages)
        if self.allocator.num_free < need:
            self.cache.evict(need - self.allocator.num_free)
        own = self.allocator.alloc(need)
        if own is None:  # out of memory even after eviction: the scheduler would wait
            self.cache.unlock(m.node)
            return
        self.requests.append(SimRequest(tokens, m.node, m.pages, own))

    def _insert_full_pages(self, req: SimRequest) -> tuple[RadixNode, list[int]]:
        full = len(req.tokens) // self.PAGE_SIZE
        pages = req.shared + req.own
        r = self.cache.insert(req.tokens[: full * self.PAGE_SIZE], pages[:full])
        assert r.num_tokens == full * self.PAGE_SIZE
        assert r.pages[: len(req.shared)] == req.shared  # locked pages stay canonical
        assert path_hashes(r.node) == hash_token_blocks(req.tokens, self.PAGE_SIZE)
        return r.node, r.pages

    @precondition(lambda self: self.requests)
    @rule(idx=st.integers(0, 100))
    def finish(self, idx: int) -> None:
        req = self._pop(idx)
        self._insert_full_pages(req)
        full = len(req.tokens) // self.PAGE_SIZE
        self.allocator.free((req.shared + req.own)[full:])  # the partial tail page
        self.cache.unlock(req.node)

    @precondition(lambda self: self.requests)
    @rule(idx=st.integers(0, 100))
    def checkpoint(self, idx: int) -> None:
        """A chunk finished: cache what is done and keep running on the canonical pages."""
        req = self._pop(idx)
        node, pages = self._insert_full_pages(req)
        self.cache.lock(node)
        self.cache.unlock(req.node)
        tail = (req.shared + req.own)[len(pages) :]
        self.requests.append(SimRequest(req.tokens, node, pages, tail))

    @precondition(lambda self: self.requests)
    @rule(idx=st.integers(0, 100))
    def abort(self, idx: int) -> None:
        req = self._pop(idx)
        self.allocator.free(req.own)
        self.cache.unlock(req.node)

    @rule(tokens=tokens_st)
    def match(self, tokens: list[int]) -> None:
        m = self.cache.match_prefix(tokens)
        assert m.num_tokens // self.PAGE_SIZE == self.mirror.prefix_blocks(tokens, self.PAGE_SIZE)
        assert path_hashes(m.node) == hash_token_blocks(tokens[: m.num_tokens], self.PAGE_SIZE)

    @rule(n=st.integers(0, 6))
    def evict(self, n: int) -> None:
        evictable, free = self.cache.evictable_pages, self.allocator.num_free
        freed = self.cache.evict(n)
        assert min(n, evictable) <= freed <= evictable
        assert self.allocator.num_free == free + freed

    @rule()
    def reset(self) -> None:
        if self.cache.protected_pages:
            with pytest.raises(RuntimeError):
                self.cache.reset()
            return
        self.cache.reset()
        assert all(not r.shared for r in self.requests)

    @invariant()
    def pages_accounted_and_mirrored(self) -> None:
        held = sum(len(r.own) for r in self.requests)
        total = self.allocator.num_free + self.cache.cached_pages + held
        assert total == self.NUM_PAGES
        shared = sum(len(r.shared) > 0 for r in self.requests)
        assert not shared or self.cache.protected_pages > 0
        self.cache.check_invariants()
        assert set(self.mirror.parent) == self.cache.block_hashes()


class CacheMachinePage1(CacheMachine):
    PAGE_SIZE = 1
    NUM_PAGES = 10
    tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=8)


_machine_settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = _machine_settings
TestCacheMachinePage1 = CacheMachinePage1.TestCase
TestCacheMachinePage1.settings = _machine_settings
