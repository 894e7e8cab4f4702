"""The worker's KV-cache events as an NDJSON stream a KV-aware router (another process) mirrors.

`KVEventLog` subscribes to the engine's `KVEventPublisher`, numbers the events 1, 2, 3, ...,
keeps the newest ones in a ring and mirrors the cache's current block set. A router that
reconnects with the last id it saw (and this log's `instance`) gets the missed events replayed;
one that is new, comes from another worker process, or fell further behind than the ring
reaches gets a snapshot of the block set instead, taken under the same lock events are logged
under, so the snapshot plus the events after its id is exactly the cache.

Stream (`kv_event_lines`), one JSON object per line:
  {"type":"hello","instance":I,"block_size":B,"last_event_id":N,"role":R}  (both|prefill|decode)
  {"type":"snapshot","id":N,"blocks":[[hash,parent],...]}  (only when not replaying; parents first)
  {"type":"event","id":K,"event":{...}}                     (replayed, then live; ids consecutive)
  {"type":"load",...}                                       (at once, then every load_interval)
A consumer too slow for the ring sees the stream end and reconnects for a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from bisllm_server.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventPublisher,
)

if TYPE_CHECKING:
    from bisllm_server.engine.engine import LLMEngine

LoggedEvent = tuple[int, dict[str, Any]]


class EventsLost(Exception):
    """Events after the requested id have already left the ring; the consumer must resync."""


class KVEventLog:
    def __init__(
        self,
        publisher: KVEventPublisher,
        *,
        block_size: int,
        capacity: int = 65536,
        role: str = "both",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.block_size = block_size
        self.role = role  # announced in the hello: both, or prefill / decode when disaggregated
        self.instance = uuid.uuid4().hex  # tells a restarted worker apart from its predecessor
        self._lock = threading.Lock()
        self._ring: deque[LoggedEvent] = deque(maxlen=capacity)
        # block hash -> parent hash, in insertion order: a parent is always stored before its
        # children and evicted after them, so iteration lists parents first.
        self._blocks: dict[int, int | None] = {}
        self._last_id = 0
        # One-shot waiters, dropped when woken, so a burst of events wakes each at most once.
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.ended = False  # set at server shutdown: every stream ends
        self._unsubscribe = publisher.subscribe(self._on_event)

    def close(self) -> None:
        """Stop logging (the engine keeps publishing to its other subscribers)."""
        self._unsubscribe()

    def end_streams(self) -> None:
        """End every stream now (the server is shutting down), so a graceful shutdown does not
        wait on routers' connections, which never end by themselves."""
        with self._lock:
            self.ended = True
            waiters, self._waiters = self._waiters, set()
        for loop, ready in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ready.set)

    @property
    def last_event_id(self) -> int:
        return self._last_id

    def _on_event(self, event: KVEvent) -> None:
        """Runs on the engine thread, inside the engine step: must be quick and never raise."""
        with self._lock:
            if isinstance(event, BlockStored):
                parent = event.parent_block_hash
                for block in event.block_hashes:
                    self._blocks[block] = parent
                    parent = block
            elif isinstance(event, BlockRemoved):
                for block in event.block_hashes:
                    self._blocks.pop(block, None)
            elif isinstance(event, AllBlocksCleared):
                self._blocks.clear()
            self._last_id += 1
            self._ring.append((self._last_id, event.to_dict()))
            waiters, self._waiters = self._waiters, set()
        for loop, ready in waiters:
            # A closed loop took its waiter with it; raising here would fail the engine step.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ready.set)

    def _oldest_id(self) -> int:
        """Id of the oldest event still in the ring (last id + 1 when it is empty)."""
        return self._ring[0][0] if self._ring else self._last_id + 1

    def _tail(self, after_id: int) -> list[LoggedEvent]:
        # Ids in the ring are consecutive, so the events after `after_id` are its last n.
        n = max(0, self._last_id - after_id)
        return list(itertools.islice(reversed(self._ring), n))[::-1]

    def events_since(self, after_id: int) -> list[LoggedEvent]:
        """Every event with id > after_id, oldest first; EventsLost if some left the ring."""
        with self._lock:
            if self._oldest_id() > after_id + 1:
                raise EventsLost(f"events {after_id + 1}..{self._oldest_id() - 1} were dropped")
            return self._tail(after_id)

    def read_since(
        self, since: int | None, instance: str | None
    ) -> tuple[list[list[int | None]] | None, list[LoggedEvent], int]:
        """(None, events after `since`, last id) when they can be replayed, else
        (snapshot as [[hash, parent], ...] parents first, [], last id)."""
        with self._lock:
            last = self._last_id
            if (
                instance == self.instance
                and since is not None
                and self._oldest_id() - 1 <= since <= last
            ):
                return None, self._tail(since), last
            return [[block, parent] for block, parent in self._blocks.items()], [], last

    async def wait_for(self, after_id: int, timeout: float) -> bool:
        """Wait until an event with id > after_id exists (True) or `timeout` seconds pass."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            if self._last_id > after_id or self.ended:
                return self._last_id > after_id
            self._waiters.add(waiter)
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await waiter[1].wait()
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)
        return self._last_id > after_id


def load_report(engine: LLMEngine) -> dict[str, Any]:
    """What a router weighs a worker by: the engine's latest step stats and its sizes."""
    stats = engine.stats  # replaced whole every step, so this one object is consistent
    return {
        "in_flight_tokens": stats.in_flight_tokens,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "kv_pages_used": stats.kv_pages_used,
        "kv_pages_total": stats.kv_pages_total,
        "prompt_tokens_total": stats.prompt_tokens_total,
        "cached_tokens_total": stats.cached_tokens_total,
        "max_num_tokens": engine.config.max_num_tokens,
        "max_batch_size": engine.config.max_batch_size,
    }


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _event_lines(events: list[LoggedEvent]) -> bytes:
    return b"".join(_line({"type": "event", "id": k, "event": event}) for k, event in events)


async def kv_event_lines(
    log: KVEventLog,
    load: Callable[[], dict[str, Any]],
    since: int | None,
    instance: str | None,
    *,
    load_interval: float = 0.5,
) -> AsyncIterator[bytes]:
    """The NDJSON stream described in the module docstring. Each chunk holds one or more
    whole lines (events logged together go out in one chunk). Ends only when the consumer fell
    behind the ring; a client disconnect cancels it."""
    blocks, replay, cursor = log.read_since(since, instance)
    hello = {
        "type": "hello",
        "instance": log.instance,
        "block_size": log.block_size,
        "last_event_id": cursor,
        "role": log.role,
    }
    yield _line(hello)
    if blocks is not None:
        yield _line({"type": "snapshot", "id": cursor, "blocks": blocks})
    elif replay:
        yield _event_lines(replay)
    clock = asyncio.get_running_loop().time
    next_load = clock()
    while not log.ended:
        try:
            fresh = log.events_since(cursor)
        except EventsLost:
            return  # the router reconnects and gets a snapshot
        if fresh:
            yield _event_lines(fresh)
            cursor = fresh[-1][0]
        if clock() >= next_load:  # also the heartbeat of an idle stream
            yield _line({"type": "load", **load()})
            next_load = clock() + load_interval
        await log.wait_for(cursor, next_load - clock())
