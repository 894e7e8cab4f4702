"""Continuous batching: which requests run this step, with how many new tokens, on which pages.

Every running request is treated alike: it has `num_uncomputed` tokens without K/V (the whole
remaining prompt while prefilling, exactly one while decoding) and gets a chunk of them each
step. Running requests go first, oldest first, so decodes keep flowing while a long prompt is
chunked behind them (Sarathi-style mixing); waiting requests are admitted into what is left of
the token budget. When the pool runs dry the radix cache gives back unlocked pages first, then
the newest running request is retracted: its computed pages go into the prefix cache and it
rejoins the front of the queue, so it resumes from its cached prefix and loses nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from bisllm_server.engine.kv_cache import PageAllocator
from bisllm_server.engine.radix_cache import RadixCache
from bisllm_server.engine.request import Request, RequestStatus

# Like SGLang: longest-prefix-match ordering costs a tree walk per waiting request, so a long
# queue falls back to FCFS.
LPM_QUEUE_LIMIT = 128


@dataclass
class ScheduledBatch:
    items: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    cached_tokens: int = 0  # prefix-cache hits of the requests admitted this step

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def samples(self, req: Request, n: int) -> bool:
        """True when this chunk reaches the end of the request's tokens, so it yields logits."""
        return req.num_computed + n == req.seq_len


@dataclass
class KVReservation:
    """Pages set aside for a request before its prefix K/V arrives: the cached pages it can
    reuse (their radix node locked) and fresh pages for the rest."""

    matched_pages: list[int]
    fresh_pages: list[int]
    cache_node: object

    @property
    def num_matched_pages(self) -> int:
        return len(self.matched_pages)


class Scheduler:
    def __init__(
        self,
        *,
        allocator: PageAllocator,
        cache: RadixCache | None,
        page_size: int,
        max_batch_size: int,
        max_num_tokens: int,
        enable_chunked_prefill: bool,
        schedule_policy: str = "fcfs",
    ) -> None:
        self.allocator = allocator
        self.cache = cache
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.schedule_policy = schedule_policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_rows: list[int] = list(range(max_batch_size - 1, -1, -1))
        self.num_retractions = 0

    # -- queue management ---------------------------------------------------------------

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, req: Request) -> None:
        """Drop a request from whichever queue holds it and release its KV (caching it)."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
            if req.reservation is not None:
                self.cancel_reservation(req.reservation)
                req.reservation = None
        req.status = RequestStatus.FINISHED

    def reserve(self, prefix_ids: Sequence[int], num_tokens: int) -> KVReservation | None:
        """Pages for a request whose prefix K/V will arrive from elsewhere (disaggregation's
        pre-allocation): the prefix cache's match for `prefix_ids`, locked, plus fresh pages
        up to `num_tokens`. None if the pool has no room even after evicting."""
        node, matched = None, []
        if self.cache is not None:
            match = self.cache.match_prefix(list(prefix_ids))
            node, matched = match.node, list(match.pages)
            self.cache.lock(node)
        need = self._pages_for(num_tokens) - len(matched)
        fresh = self.allocator.alloc(need) if need > 0 else []
        if fresh is None and self.cache is not None:
            self.cache.evict(need - self.allocator.num_free)
            fresh = self.allocator.alloc(need)
        if fresh is None:
            self._unlock(node)
            return None
        return KVReservation(matched, fresh, node)

    def cancel_reservation(self, reservation: KVReservation) -> None:
        """Give back a reservation's pages: nothing was written into the fresh ones."""
        self.allocator.free(reservation.fresh_pages)
        self._unlock(reservation.cache_node)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def pages_held_by_requests(self) -> int:
        """Pages owned by running requests alone (not shared through the radix cache)."""
        return sum(len(r.pages) - r.num_tree_pages for r in self.running)

    # -- one step -----------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            req = self.running[index]
            n = min(req.num_uncomputed, budget)
            if self._reserve_or_retract(req, req.num_computed + n):
                batch.items.append((req, n))
                budget -= n
                index += 1
            # else: req itself was retracted; running[index] is now the next request (if any)
        if budget > 0 and self.waiting and self.free_rows:
            self._admit(batch, budget)
        return batch

    def after_forward(self, batch: ScheduledBatch) -> None:
        """Advance computed counts; publish freshly prefilled full pages to the prefix cache."""
        for req, n in batch.items:
            req.num_computed += n
            # Draft tokens' K/V is only kept if verification accepts them: nothing to publish.
            if n > 1 and self.cache is not None and not req.num_draft:
                self._cache_computed_pages(req)

    def trim_pages(self, req: Request) -> None:
        """Free a running request's own pages past what its tokens need (those reserved for
        draft tokens that verification rejected)."""
        keep = max(self._pages_for(req.seq_len), req.num_tree_pages)
        if keep < len(req.pages):
            self.allocator.free(req.pages[keep:])
            del req.pages[keep:]
            req.num_synced_pages = min(req.num_synced_pages, keep)

    # -- admission ----------------------------------------------------------------------

    def _admission_order(self) -> list[Request]:
        if self.schedule_policy != "lpm" or self.cache is None:
            return list(self.waiting)
        if len(self.waiting) > LPM_QUEUE_LIMIT:
            return list(self.waiting)
        cache = self.cache
        matched = {
            id(r): cache.match_prefix(r.token_ids[: r.seq_len - 1]).num_tokens for r in self.waiting
        }
        return sorted(self.waiting, key=lambda r: (-matched[id(r)], r.arrival))

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        for req in self._admission_order():
            if budget <= 0 or not self.free_rows:
                return
            reservation = req.reservation
            node = None
            matched_pages: list[int] = []
            if reservation is not None:  # matched and locked when it was reserved
                node, matched_pages = reservation.cache_node, reservation.matched_pages
            elif self.cache is not None:
                # Keep at least one token to compute: its logits give the next token.
                match = self.cache.match_prefix(req.token_ids[: req.seq_len - 1])
                node, matched_pages = match.node, match.pages
                self.cache.lock(node)
            matched = len(matched_pages) * self.page_size
            start = matched
            kv = req.kv_import
            if kv is not None:
                if kv.start_page > len(matched_pages):
                    req.kv_import = None  # pages it leaves out are not here: compute them
                else:
                    # The prefix K/V came with the request: only the rest (normally the last
                    # prompt token) is left to compute, but the prefix still needs its pages.
                    start = max(matched, kv.num_tokens)
            remaining = req.seq_len - start
            # Without chunking the whole prompt must fit in one step (head-of-line wait). A
            # retracted request may have outgrown the budget; it alone is still chunked.
            if not self.enable_chunked_prefill and budget < remaining <= self.max_num_tokens:
                if reservation is None:
                    self._unlock(node)
                return
            n = min(remaining, budget)
            req.pages = list(matched_pages)
            if reservation is not None:
                req.pages += reservation.fresh_pages
            req.num_tree_pages = len(matched_pages)
            req.cache_node = node
            req.num_computed = start
            if not self._reserve(req, start + n):
                req.pages, req.num_tree_pages, req.cache_node, req.num_computed = [], 0, None, 0
                if reservation is None:
                    self._unlock(node)
                return
            req.reservation = None  # its pages are the request's now
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            req.row = self.free_rows.pop()
            req.num_synced_pages = 0
            req.prefill_hit = matched
            if req.num_retractions == 0:
                req.num_cached_tokens = matched
            batch.cached_tokens += matched
            self.running.append(req)
            batch.items.append((req, n))
            budget -= n

    # -- pages --------------------------------------------------------------------------

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Give `req` pages for its first `num_tokens` tokens, evicting cached pages if needed."""
        need = self._pages_for(num_tokens) - len(req.pages)
        if need <= 0:
            return True
        pages = self.allocator.alloc(need)
        if pages is None and self.cache is not None:
            self.cache.evict(need - self.allocator.num_free)
            pages = self.allocator.alloc(need)
        if pages is None:
            return False
        req.pages.extend(pages)
        return True

    def _reserve_or_retract(self, req: Request, num_tokens: int) -> bool:
        while not self._reserve(req, num_tokens):
            victim = self.running[-1]
            self._retract(victim)
            if victim is req:
                return False
        return True

    def _retract(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_retractions += 1
        self.num_retractions += 1
        # Newest retracted first, so older ones end up ahead of it: arrival order is kept.
        self.waiting.appendleft(req)

    def _release(self, req: Request) -> None:
        """Return a request's pages: computed full pages to the cache, everything else freed."""
        if self.cache is not None:
            full = req.num_computed // self.page_size
            if full > 0:
                self.cache.insert(req.token_ids[: full * self.page_size], req.pages[:full])
            self.allocator.free(req.pages[full:])
            self._unlock(req.cache_node)
        else:
            self.allocator.free(req.pages)
        req.pages = []
        req.num_tree_pages = 0
        req.cache_node = None
        req.num_computed = 0
        self.free_rows.append(req.row)
        req.row = -1

    def _cache_computed_pages(self, req: Request) -> None:
        """SGLang's cache_unfinished_req: share the prefilled prefix while the request runs."""
        assert self.cache is not None
        full = req.num_computed // self.page_size
        if full <= req.num_tree_pages:
            return
        match = self.cache.insert(req.token_ids[: full * self.page_size], req.pages[:full])
        if match.pages != req.pages[:full]:
            req.pages[:full] = match.pages
            req.num_synced_pages = 0
        self.cache.lock(match.node)
        self._unlock(req.cache_node)
        req.cache_node = match.node
        req.num_tree_pages = full

    def _unlock(self, node: object) -> None:
        if node is not None and self.cache is not None:
            self.cache.unlock(node)
