"""The router's index of every worker's KV cache, kept in sync by the workers' KV events.

Block ids are chained hashes (`bisllm_server.kv_events`), so one id names a whole prefix and a
per-worker set of ids is that worker's radix tree flattened: a worker holds a prompt's first k
blocks exactly when it holds the k-th id. Two invariants make lookups cheap and errors loud:

- prefix-closed: a worker's set holds a block only with its parent. A BlockStored whose parent
  the index does not know means an event was lost, and raises `IndexOutOfSync` so the caller
  resyncs that worker from a snapshot instead of routing on a wrong picture.
- so a worker's overlap with a prompt is the largest k whose k-th id it holds, found by binary
  search: O(log n) dictionary probes per worker, however long the prompt.

Blocks of requests just routed count as cached on their worker for `predicted_ttl_s`, until the
worker's own events confirm them (prefill takes time; a burst of requests sharing a new prefix
would otherwise scatter before the first one's blocks are reported).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from bisllm_server.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


class IndexOutOfSync(Exception):
    """A worker's events do not fit the index's picture of its cache; resync that worker."""


class KVIndex:
    def __init__(
        self, predicted_ttl_s: float = 120.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.predicted_ttl_s = predicted_ttl_s
        self._clock = clock
        # worker -> {block id: parent id}; insertion order keeps parents before children.
        self._blocks: dict[str, dict[int, int | None]] = {}
        # worker -> {block id: expiry}; refreshed ids move to the end, so expiry is ascending.
        self._predicted: dict[str, OrderedDict[int, float]] = {}

    # -- workers -------------------------------------------------------------------------------

    def add_worker(self, worker: str) -> None:
        self._blocks.setdefault(worker, {})
        self._predicted.setdefault(worker, OrderedDict())

    def remove_worker(self, worker: str) -> None:
        self._blocks.pop(worker, None)
        self._predicted.pop(worker, None)

    def num_blocks(self, worker: str) -> int:
        return len(self._blocks.get(worker, ()))

    def blocks(self, worker: str) -> list[tuple[int, int | None]]:
        """(id, parent) of every block the worker reported, parents first (snapshot form)."""
        return list(self._blocks.get(worker, {}).items())

    # -- events --------------------------------------------------------------------------------

    def apply(self, worker: str, event: KVEvent) -> None:
        """Apply one of `worker`'s events; IndexOutOfSync if it does not fit (lost events)."""
        blocks = self._blocks.get(worker)
        if blocks is None:
            raise KeyError(f"unknown worker {worker!r}")
        predicted = self._predicted[worker]
        if isinstance(event, BlockStored):
            parent = event.parent_block_hash
            if parent is not None and parent not in blocks:
                raise IndexOutOfSync(
                    f"{worker}: stored block {event.block_hashes[0]} whose parent {parent} "
                    "the index does not hold"
                )
            for block in event.block_hashes:
                blocks[block] = parent
                parent = block
                # Confirmed: from now on the worker's own events say when it goes.
                predicted.pop(block, None)
        elif isinstance(event, BlockRemoved):
            for block in event.block_hashes:
                blocks.pop(block, None)
        elif isinstance(event, AllBlocksCleared):
            blocks.clear()
            predicted.clear()
        else:
            raise TypeError(f"not a KV event: {event!r}")

    def replace(self, worker: str, blocks: Iterable[tuple[int, int | None]]) -> None:
        """Resync: the worker's whole cache, (id, parent) pairs with parents first."""
        fresh: dict[int, int | None] = {}
        for block, parent in blocks:
            if parent is not None and parent not in fresh:
                raise IndexOutOfSync(f"{worker}: snapshot lists block {block} before its parent")
            fresh[block] = parent
        self._blocks[worker] = fresh
        predicted = self._predicted.setdefault(worker, OrderedDict())
        for block in [b for b in predicted if b in fresh]:
            del predicted[block]

    # -- predictions ---------------------------------------------------------------------------

    def predict(self, worker: str, block_ids: Sequence[int]) -> None:
        """Count `block_ids` (a whole prompt chain) as cached on `worker` until its events
        store them, or for the TTL at most (the request may fail or be aborted)."""
        predicted = self._predicted.get(worker)
        if predicted is None or self.predicted_ttl_s <= 0:
            return
        expiry = self._clock() + self.predicted_ttl_s
        blocks = self._blocks[worker]
        for block in block_ids:
            if block in blocks:
                continue  # already reported: its eviction will be reported too
            predicted[block] = expiry
            predicted.move_to_end(block)

    def _expire(self, now: float) -> None:
        for predicted in self._predicted.values():
            while predicted:
                _, expiry = next(iter(predicted.items()))
                if expiry > now:
                    break
                predicted.popitem(last=False)

    # -- lookups ---------------------------------------------------------------------------------

    def overlaps(
        self, block_ids: Sequence[int], workers: Iterable[str] | None = None
    ) -> dict[str, int]:
        """How many leading blocks of the prompt each worker holds (reported or predicted)."""
        self._expire(self._clock())
        result = {}
        hint = 0  # workers often hold the same prefix (a shared system prompt): try theirs first
        for worker in self._blocks if workers is None else workers:
            blocks = self._blocks.get(worker)
            if blocks is not None:
                hint = result[worker] = _held_prefix(
                    block_ids, blocks, self._predicted[worker], hint
                )
        return result

    def reported_overlap(self, worker: str, block_ids: Sequence[int]) -> int:
        """Leading blocks `worker` has reported, predictions left out."""
        return _held_prefix(block_ids, self._blocks.get(worker, {}), {})


def _held_prefix(block_ids: Sequence[int], blocks: dict, predicted: dict, hint: int = 0) -> int:
    """Largest k such that block_ids[k-1] is reported or predicted (0 if none): a binary
    search, valid because both sets, and so their union, are prefix-closed. Predictions are
    dropped as blocks are stored, and a worker stores a request's blocks while it holds them,
    so a predicted block never outlives a reported parent it depends on."""
    n = len(block_ids)
    if n == 0:
        return 0
    first = block_ids[0]
    if first not in blocks and first not in predicted:
        return 0  # the common case for most workers: not even the first block
    last = block_ids[-1]
    if last in blocks or last in predicted:
        return n
    if 0 < hint < n:  # two probes confirm a guess: held up to hint, not after
        before, after = block_ids[hint - 1], block_ids[hint]
        if (before in blocks or before in predicted) and not (
            after in blocks or after in predicted
        ):
            return hint
    lo, hi = 1, n - 1  # invariant: the first lo are held; those past hi are not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        block = block_ids[mid - 1]
        if block in blocks or block in predicted:
            lo = mid
        else:
            hi = mid - 1
    return lo
