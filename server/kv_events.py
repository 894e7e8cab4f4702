"""KV-cache events: what an engine stores and evicts, in a form a router can mirror.

Shared by the engine (publisher) and the KV-aware router (another process), so it is stdlib
only. Block ids are chained content hashes: block i's hash covers its tokens *and* block i-1's
hash, so equal hashes mean equal prefixes, and a router hashing a prompt with
`hash_token_blocks` lands on the same ids the engine published.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

HASH_BITS = 63  # non-negative and fits an int64 column / JSON number on every consumer
_HASH_MASK = (1 << HASH_BITS) - 1
# Personalisation keeps these ids apart from any other blake2b use of the same bytes.
_HASH_PERSON = b"bisllm-kv-v1"


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained id of one block: blake2b over the parent id and the tokens as int64 LE bytes.

    Deterministic across processes and runs (no Python `hash()`, so PYTHONHASHSEED is moot).
    """
    h = hashlib.blake2b(digest_size=8, person=_HASH_PERSON)
    # A tag byte tells "no parent" apart from a parent whose id happens to be 0.
    h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(h.digest(), "little") & _HASH_MASK


def hash_token_blocks(
    token_ids: Sequence[int], block_size: int, parent_hash: int | None = None
) -> list[int]:
    """Chained ids of every *full* block of `token_ids`; a trailing partial block is ignored.

    Same ids as `hash_block` block by block, computed faster for long prompts (the router
    hashes every request): the tokens are packed once and each block hashes a view of them,
    from a copy of a hasher already keyed with the personalisation."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    full = len(token_ids) // block_size
    if full == 0:
        return []
    packed = memoryview(struct.pack(f"<{full * block_size}q", *token_ids[: full * block_size]))
    step = block_size * 8
    seed = hashlib.blake2b(digest_size=8, person=_HASH_PERSON)
    hashes: list[int] = []
    for i in range(full):
        h = seed.copy()
        h.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(8, "little"))
        h.update(packed[i * step : (i + 1) * step])
        parent_hash = int.from_bytes(h.digest(), "little") & _HASH_MASK
        hashes.append(parent_hash)
    return hashes


@dataclass(slots=True)
class BlockStored:
    """Blocks whose KV is computed and now cached; `token_ids` covers all of them, in order."""

    TYPE: ClassVar[str] = "BlockStored"
    block_hashes: list[int]
    parent_block_hash: int | None  # id of the block before the first one; None at the root
    token_ids: list[int]
    block_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "block_hashes": list(self.block_hashes),
            "parent_block_hash": self.parent_block_hash,
            "token_ids": list(self.token_ids),
            "block_size": self.block_size,
        }


@dataclass(slots=True)
class BlockRemoved:
    """Blocks evicted from the cache (always whole suffixes: a block goes before its parent)."""

    TYPE: ClassVar[str] = "BlockRemoved"
    block_hashes: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "block_hashes": list(self.block_hashes)}


@dataclass(slots=True)
class AllBlocksCleared:
    """The whole cache was dropped; mirrors forget everything from this worker."""

    TYPE: ClassVar[str] = "AllBlocksCleared"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE}


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
KVEventCallback = Callable[[KVEvent], None]


def event_from_dict(data: dict[str, Any]) -> KVEvent:
    """Inverse of `to_dict`; raises ValueError on an unknown or malformed event."""
    kind = data.get("type")
    try:
        if kind == BlockStored.TYPE:
            parent = data["parent_block_hash"]
            return BlockStored(
                block_hashes=[int(h) for h in data["block_hashes"]],
                parent_block_hash=None if parent is None else int(parent),
                token_ids=[int(t) for t in data["token_ids"]],
                block_size=int(data["block_size"]),
            )
        if kind == BlockRemoved.TYPE:
            return BlockRemoved(block_hashes=[int(h) for h in data["block_hashes"]])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {kind} event: {data!r}") from exc
    if kind == AllBlocksCleared.TYPE:
        return AllBlocksCleared()
    raise ValueError(f"unknown KV event type {kind!r}")


class KVEventPublisher:
    """In-process fan-out of KV events, delivered synchronously and in order.

    A transport (ZMQ, HTTP stream, ...) is just another subscriber. Event ids increase by one
    per event, so a remote mirror can spot a gap and ask for a resync.
    """

    def __init__(self) -> None:
        self._subscribers: list[KVEventCallback] = []
        self._ids = itertools.count(1)
        self._last_event_id = 0
        # Re-entrant so a subscriber may (un)subscribe while being called.
        self._lock = threading.RLock()

    @property
    def last_event_id(self) -> int:
        """Id of the newest published event; 0 before the first."""
        return self._last_event_id

    def subscribe(self, callback: KVEventCallback) -> Callable[[], None]:
        """Register `callback`; returns a function that unregisters it (safe to call twice)."""
        with self._lock:
            # Copy-on-write: a publish in flight keeps iterating its own snapshot.
            self._subscribers = [*self._subscribers, callback]

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [cb for cb in self._subscribers if cb is not callback]

        return unsubscribe

    def publish(self, event: KVEvent) -> int:
        """Deliver `event` to every subscriber and return its id.

        A subscriber that raises propagates to the caller: a mirror that silently misses an
        event would drift from the cache for good.
        """
        # Delivery happens under the lock so ids reach every subscriber in increasing order.
        with self._lock:
            event_id = self._last_event_id = next(self._ids)
            for callback in self._subscribers:
                callback(event)
        return event_id
