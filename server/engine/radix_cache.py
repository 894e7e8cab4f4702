"""Page-granular radix prefix cache (SGLang RadixCache semantics, keyed by whole pages).

Every edge holds a multiple of `page_size` tokens and one KV page per `page_size` tokens, so
a hit is always a list of whole pages the request can share read-only.

How the engine uses it. A page lives in exactly one place: the allocator's free list, the
tree, or a single request that has not inserted it yet.

    m = cache.match_prefix(prompt)      # m.pages hold m.num_tokens cached tokens, shared
    cache.lock(m.node)                  # keep them alive while the request runs
    own = allocator.alloc(...)          # the request's pages for the rest of the sequence
    ...                                 # forward passes fill them
    r = cache.insert(tokens[:n_full], (m.pages + own)[:n_full_pages])
    #   the cache now owns every page passed in and freed its duplicates; r.pages is the
    #   canonical page table prefix. A running request re-locks: lock(r.node), unlock(m.node);
    #   a finished one just unlocks m.node and frees its pages past the last full page.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from bisllm_server.engine.kv_cache import PageAllocator
from bisllm_server.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventPublisher,
    hash_block,
)


@dataclass(eq=False, slots=True)
class RadixNode:
    """One edge of the tree; identity-hashed so nodes can sit in sets."""

    key: tuple[int, ...]  # token ids, len == len(pages) * page_size
    pages: list[int]
    hashes: list[int]  # chained block hash of each page, see kv_events.hash_block
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    lock_ref: int = 0  # locks on this node or any descendant
    last_access: int = 0  # logical clock, not wall time: deterministic LRU
    uid: int = 0  # creation order; breaks LRU ties deterministically


@dataclass(slots=True)
class PrefixMatch:
    pages: list[int]
    num_tokens: int  # == len(pages) * page_size
    node: RadixNode  # deepest node covering exactly the match (the root when nothing matched)


class RadixCache:
    def __init__(
        self,
        page_size: int,
        allocator: PageAllocator,
        publisher: KVEventPublisher | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.allocator = allocator
        self.publisher = publisher
        self._clock = itertools.count(1)
        self._uids = itertools.count(1)
        self.root = RadixNode(key=(), pages=[], hashes=[], parent=None, lock_ref=1)
        self._evictable_pages = 0
        self._protected_pages = 0
        self._num_nodes = 0
        # Unlocked leaves, kept up to date incrementally so evict() never walks the tree.
        self._evictable_leaves: set[RadixNode] = set()
        # Which page ids the tree owns: catches a caller handing in a page twice.
        self._in_tree = bytearray(allocator.num_pages)

    # ---- counters -------------------------------------------------------------------------

    @property
    def evictable_pages(self) -> int:
        return self._evictable_pages

    @property
    def protected_pages(self) -> int:
        return self._protected_pages

    @property
    def cached_pages(self) -> int:
        return self._evictable_pages + self._protected_pages

    @property
    def num_nodes(self) -> int:
        """Nodes excluding the root."""
        return self._num_nodes

    # ---- lookup / insert ------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> PrefixMatch:
        """Longest cached prefix of the full pages of `token_ids`; refreshes LRU on the path."""
        n = len(token_ids) // self.page_size * self.page_size
        tokens = tuple(token_ids[:n])
        node, pos, pages = self.root, 0, []
        now = next(self._clock)
        for child, matched in self._walk(tokens):
            child.last_access = now
            pages.extend(child.pages)
            node, pos = child, pos + matched
        return PrefixMatch(pages, pos, node)

    def insert(self, token_ids: Sequence[int], pages: list[int]) -> PrefixMatch:
        """Cache `pages` as the KV of `token_ids`, taking ownership of every page passed in.

        Pages whose content the tree already holds under another id are freed at once; the
        result lists the tree's (canonical) pages for the whole key and its last node.
        """
        ps = self.page_size
        if len(token_ids) != len(pages) * ps:
            raise ValueError(
                f"insert: {len(token_ids)} tokens != {len(pages)} pages x page_size {ps}"
            )
        tokens = tuple(token_ids)
        node, pos, canonical, duplicates = self.root, 0, [], []
        now = next(self._clock)
        for child, matched in self._walk(tokens):
            child.last_access = now
            mine = pages[pos // ps : (pos + matched) // ps]
            duplicates.extend(p for p, t in zip(mine, child.pages, strict=True) if p != t)
            canonical.extend(child.pages)
            node, pos = child, pos + matched
        new_pages = pages[pos // ps :]
        self._check_owned(duplicates + new_pages)
        if new_pages:
            node = self._add_leaf(node, tokens[pos:], new_pages, now)
            canonical.extend(new_pages)
        if duplicates:
            self.allocator.free(duplicates)
        return PrefixMatch(canonical, len(canonical) * ps, node)

    def _walk(self, tokens: tuple[int, ...]) -> Iterator[tuple[RadixNode, int]]:
        """Yield (node, tokens matched in it) down the path of `tokens` (page-aligned).

        A match that ends inside an edge splits it first, so the last node yielded covers
        exactly the matched tokens.
        """
        ps, node, pos = self.page_size, self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + ps])
            if child is None:
                return
            key, matched = child.key, ps  # the first page matched via the dict key
            while (
                matched < len(key)
                and key[matched : matched + ps] == tokens[pos + matched : pos + matched + ps]
            ):
                matched += ps
            if matched < len(key):
                child = self._split(child, matched)
            yield child, matched
            node, pos = child, pos + matched
            if matched < len(key):
                return

    def _split(self, child: RadixNode, at: int) -> RadixNode:
        """Cut `child`'s edge after `at` tokens; returns the new upper node."""
        k = at // self.page_size
        parent = child.parent
        assert parent is not None
        # The upper part inherits lock_ref: every lock that covers child also covers it.
        upper = RadixNode(
            key=child.key[:at],
            pages=child.pages[:k],
            hashes=child.hashes[:k],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
            uid=next(self._uids),
        )
        child.key, child.pages, child.hashes = child.key[at:], child.pages[k:], child.hashes[k:]
        child.parent = upper
        upper.children[child.key[: self.page_size]] = child
        parent.children[upper.key[: self.page_size]] = upper
        self._num_nodes += 1
        return upper

    def _add_leaf(
        self, parent: RadixNode, key: tuple[int, ...], pages: list[int], now: int
    ) -> RadixNode:
        ps = self.page_size
        parent_hash = parent.hashes[-1] if parent.hashes else None
        hashes, h = [], parent_hash
        for i in range(0, len(key), ps):
            h = hash_block(h, key[i : i + ps])
            hashes.append(h)
        leaf = RadixNode(key, list(pages), hashes, parent, last_access=now, uid=next(self._uids))
        parent.children[key[:ps]] = leaf
        for p in pages:
            self._in_tree[p] = 1
        self._num_nodes += 1
        self._evictable_pages += len(pages)  # a new leaf starts unlocked
        self._refresh_leaf(parent)
        self._refresh_leaf(leaf)
        if self.publisher is not None:
            self.publisher.publish(BlockStored(hashes, parent_hash, list(key), ps))
        return leaf

    def _check_owned(self, pages: list[int]) -> None:
        """Pages the tree is about to adopt or free must be the caller's, not already cached."""
        if len(set(pages)) != len(pages):
            raise ValueError(f"insert: a page id is passed twice in {pages}")
        for p in pages:
            if not self.allocator.is_allocated(p):
                raise ValueError(f"insert: page {p} is not allocated")
            if self._in_tree[p]:
                raise ValueError(f"insert: page {p} already belongs to the cache elsewhere")

    # ---- locking --------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction (counted; pair with unlock)."""
        self._check_live(node)
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_pages -= len(node.pages)
                self._protected_pages += len(node.pages)
            node.lock_ref += 1
            self._refresh_leaf(node)
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: RadixNode) -> None:
        self._check_live(node)
        while node is not self.root:
            if node.lock_ref == 0:
                raise RuntimeError("unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_pages -= len(node.pages)
                self._evictable_pages += len(node.pages)
            self._refresh_leaf(node)
            node = node.parent  # type: ignore[assignment]

    def _check_live(self, node: RadixNode) -> None:
        if node is not self.root and node.parent is None:
            raise RuntimeError("node was evicted or reset; re-match instead of reusing it")

    def _refresh_leaf(self, node: RadixNode) -> None:
        if node is not self.root and not node.children and node.lock_ref == 0:
            self._evictable_leaves.add(node)
        else:
            self._evictable_leaves.discard(node)

    # ---- eviction -------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free least-recently-used unlocked leaves until `num_pages` are freed (whole leaves,
        so possibly more) or nothing is evictable. Returns the number of pages freed."""
        heap = [(n.last_access, n.uid, n) for n in self._evictable_leaves]
        heapq.heapify(heap)
        freed, removed = 0, []
        while freed < num_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            self.allocator.free(leaf.pages)
            for p in leaf.pages:
                self._in_tree[p] = 0
            freed += len(leaf.pages)
            removed.extend(leaf.hashes)
            self._evictable_pages -= len(leaf.pages)
            del parent.children[leaf.key[: self.page_size]]
            leaf.parent = None
            self._evictable_leaves.discard(leaf)
            self._num_nodes -= 1
            self._refresh_leaf(parent)
            if parent in self._evictable_leaves:  # the parent just became an unlocked leaf
                heapq.heappush(heap, (parent.last_access, parent.uid, parent))
        if removed and self.publisher is not None:
            self.publisher.publish(BlockRemoved(removed))
        return freed

    def reset(self) -> None:
        """Drop every cached page; only legal while no request holds a lock."""
        if self._protected_pages:
            raise RuntimeError("reset() while cached pages are locked by running requests")
        pages = []
        for node in self._nodes():
            pages.extend(node.pages)
            node.parent = None
        self.allocator.free(pages)
        self._in_tree = bytearray(self.allocator.num_pages)
        self.root.children.clear()
        self._evictable_leaves.clear()
        self._evictable_pages = self._protected_pages = self._num_nodes = 0
        if self.publisher is not None:
            self.publisher.publish(AllBlocksCleared())

    # ---- introspection --------------------------------------------------------------------

    def _nodes(self) -> Iterator[RadixNode]:
        """Every node except the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def block_hashes(self) -> set[int]:
        """Hashes of every cached block: what a router mirroring our events should hold."""
        return {h for node in self._nodes() for h in node.hashes}

    def check_invariants(self) -> None:
        """Recompute everything kept incrementally and compare; raises AssertionError."""

        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise AssertionError(msg)

        ps = self.page_size
        evictable = protected = count = 0
        seen_pages: set[int] = set()
        leaves: set[RadixNode] = set()
        check(self.root.lock_ref == 1 and not self.root.pages, "root must be locked and empty")
        for node in self._nodes():
            count += 1
            parent = node.parent
            check(parent is not None, "live node without parent")
            assert parent is not None
            check(len(node.key) > 0 and len(node.key) == len(node.pages) * ps, "key/page size")
            check(len(node.hashes) == len(node.pages), "one hash per page")
            check(parent.children.get(node.key[:ps]) is node, "child keyed by its first page")
            check(node.lock_ref >= sum(c.lock_ref for c in node.children.values()), "lock_ref")
            # Paths are refreshed as a whole, so LRU over leaves never strands a hotter parent.
            newest_child = max((c.last_access for c in node.children.values()), default=0)
            check(node.last_access >= newest_child, "parent older than a child")
            h = parent.hashes[-1] if parent.hashes else None
            for i, page in enumerate(node.pages):
                h = hash_block(h, node.key[i * ps : (i + 1) * ps])
                check(node.hashes[i] == h, f"hash chain broken at page {page}")
                check(page not in seen_pages, f"page {page} cached twice")
                check(self.allocator.is_allocated(page), f"cached page {page} is free")
                check(self._in_tree[page] == 1, f"page {page} missing from ownership map")
                seen_pages.add(page)
            if node.lock_ref:
                protected += len(node.pages)
            else:
                evictable += len(node.pages)
            if not node.children and node.lock_ref == 0:
                leaves.add(node)
        check(sum(self._in_tree) == len(seen_pages), "ownership map has stale pages")
        check(count == self._num_nodes, f"num_nodes {self._num_nodes} != {count}")
        check(
            evictable == self._evictable_pages, f"evictable {self._evictable_pages} != {evictable}"
        )
        check(
            protected == self._protected_pages, f"protected {self._protected_pages} != {protected}"
        )
        check(leaves == self._evictable_leaves, "evictable leaf set out of date")
