"""Hydrate a manifest onto a node: origin store → verified node cache → hardlinked target tree.

Blobs missing from the node cache (node_cache.py: layout, single-flight locks, resume records)
are fetched from the origin store in parallel ranged chunks, verified against their sha256, and
only then named in the cache; then every manifest file is placed in the target (mount.py). A
corrupt blob never reaches the target, and nothing is placed unless every blob verified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Future,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bisllm_bdn.errors import BlobCorruptError, HydrateError, UnsafePathError
from bisllm_bdn.manifest import Manifest
from bisllm_bdn.mount import is_current, place, target_path
from bisllm_bdn.node_cache import Intervals, NodeCache, read_chunk_records
from bisllm_bdn.store import BlobStore, StoreError, open_store

log = logging.getLogger(__name__)

# Attempts per chunk on a transient store error; each retry resumes from the last byte written.
CHUNK_ATTEMPTS = 4
# Bytes read per call when hashing back from the partial file.
_HASH_READ_BYTES = 8 << 20
# Set to 1 to draw the progress bar even when stderr is not a terminal.
PROGRESS_ENV = "BISLLM_BDN_PROGRESS"


@dataclass
class HydrateSummary:
    """What one hydrate call did. ``cache_hits`` counts files whose blob this call did not fetch."""

    files: int
    bytes_total: int
    bytes_fetched: int
    blobs_fetched: int
    cache_hits: int
    seconds: float
    throughput_mb_s: float
    # Bytes of partially fetched blobs taken over from an earlier, interrupted run.
    bytes_resumed: int = 0

    def to_json(self) -> str:
        """One line of JSON with sorted keys (for logs and for the metrics sidecar)."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class HydrateStats:
    """Process-wide counters across hydrate calls, for a metrics exporter to read."""

    hydrations: int = 0
    files: int = 0
    bytes_fetched: int = 0
    bytes_resumed: int = 0
    blobs_fetched: int = 0
    cache_hits: int = 0
    corrupt_blobs: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        """Increase counters atomically."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of the counters."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}


STATS = HydrateStats()


class _Cancelled(Exception):
    """Raised inside workers once another part of the hydration has failed."""


class _Progress:
    """A thread-safe byte counter drawn as a tqdm bar, or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="hydrate"
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def shrink(self, n: int) -> None:
        """Another process fetched a blob we expected to fetch: take it off the total."""
        if self._bar is not None:
            with self._lock:
                self._bar.total = max(0, self._bar.total - n)
                self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class _Blob:
    sha256: str
    size: int
    paths: list[str]


class _Assembly:
    """One blob being written into its partial file, hashed in order as chunks complete.

    Chunks finish out of order, so the sha256 advances along the contiguous finished prefix. A
    chunk that starts exactly where the hash stands feeds it while streaming; the rest is read back
    from the partial file (still in the page cache) by whichever thread holds the hashing turn.
    """

    def __init__(self, fd: int, size: int, done: Intervals, chunks_fd: int) -> None:
        self.fd = fd
        self.size = size
        self.done = done
        self.chunks_fd = chunks_fd
        self.hasher = hashlib.sha256()
        self.hashed = 0
        self._hashing = False
        self._lock = threading.Lock()

    def claim_stream(self, start: int) -> bool:
        """Take the hashing turn for a chunk starting at the hash position, if it is free."""
        with self._lock:
            if not self._hashing and self.hashed == start:
                self._hashing = True
                return True
            return False

    def chunk_done(self, start: int, end: int, streamed: bool) -> None:
        """Record a finished chunk (sidecar first, for resume), then advance the hash."""
        # A single small write to an O_APPEND file lands whole, so concurrent records never mix.
        os.write(self.chunks_fd, f"{start} {end}\n".encode("ascii"))
        with self._lock:
            self.done.add(start, end)
            if streamed:
                self.hashed = end  # we fed [start, end) while streaming and still hold the turn
            elif self._hashing:
                return  # the holder will pick this chunk up before it lets go
            else:
                self._hashing = True
        self._catch_up_holding_turn()

    def catch_up(self) -> None:
        """Hash whatever finished prefix is not hashed yet, unless another thread is on it."""
        with self._lock:
            if self._hashing:
                return
            self._hashing = True
        self._catch_up_holding_turn()

    def _catch_up_holding_turn(self) -> None:
        try:
            while True:
                with self._lock:
                    target = self.done.prefix_end()
                    if target <= self.hashed:
                        self._hashing = False
                        return
                    pos = self.hashed
                while pos < target:
                    data = os.pread(self.fd, min(_HASH_READ_BYTES, target - pos), pos)
                    if not data:
                        raise HydrateError(f"partial file shorter than expected at byte {pos}")
                    self.hasher.update(data)
                    pos += len(data)
                with self._lock:
                    self.hashed = target
        except BaseException:
            with self._lock:
                self._hashing = False
            raise


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class _Fetcher:
    """Fetches missing blobs into the node cache, one flock-guarded blob at a time per thread."""

    def __init__(
        self,
        store: BlobStore,
        cache: NodeCache,
        chunk_pool: ThreadPoolExecutor,
        chunk_bytes: int,
        progress: _Progress,
    ) -> None:
        self.store = store
        self.cache = cache
        self.chunk_pool = chunk_pool
        self.chunk_bytes = chunk_bytes
        self.progress = progress
        self.cancel = threading.Event()
        self._lock = threading.Lock()
        self.bytes_fetched = 0
        self.bytes_resumed = 0

    def ensure(self, blob: _Blob, *, block: bool) -> bool | None:
        """Make the blob present in the cache.

        Returns True when this call fetched it, False when it was (or became) cached, and None
        when `block` is off and another process holds its lock.
        """
        if self.cancel.is_set():
            raise _Cancelled
        if self.cache.has(blob.sha256, blob.size):
            self.progress.shrink(blob.size)
            return False
        with self.cache.locked(blob.sha256, blocking=block) as acquired:
            if not acquired:
                return None
            if self.cancel.is_set():
                raise _Cancelled
            # Another process may have finished it while we waited for the lock.
            if self.cache.has(blob.sha256, blob.size):
                self.progress.shrink(blob.size)
                return False
            resumed, digest = self._assemble(blob)
            if resumed:
                # A partial left by a crash was trusted; if the result is wrong, the old bytes may
                # be the culprit (power loss can lose written pages), so refetch once in full.
                try:
                    self._commit(blob, digest)
                    return True
                except BlobCorruptError:
                    log.warning(
                        "sha256:%s assembled from a resumed partial did not verify; refetching it",
                        blob.sha256,
                    )
                _, digest = self._assemble(blob)
            self._commit(blob, digest)
            return True

    def _assemble(self, blob: _Blob) -> tuple[int, str]:
        """Fetch the missing chunks into the partial file.

        Returns the bytes reused from an earlier run and the sha256 of the assembled file.
        """
        part = self.cache.part_path(blob.sha256)
        chunks = self.cache.chunks_path(blob.sha256)
        done = Intervals()
        try:
            reusable = part.stat().st_size == blob.size
        except FileNotFoundError:
            reusable = False
        if reusable:
            done = read_chunk_records(chunks, blob.size)
        else:
            chunks.unlink(missing_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not reusable:
                os.ftruncate(fd, 0)
                if blob.size:
                    try:
                        os.posix_fallocate(fd, 0, blob.size)
                    except OSError:
                        os.ftruncate(fd, blob.size)  # filesystems without fallocate
            chunks_fd = os.open(
                chunks, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
            )
            try:
                return self._fetch_chunks(blob, _Assembly(fd, blob.size, done, chunks_fd))
            finally:
                os.close(chunks_fd)
        finally:
            os.close(fd)

    def _fetch_chunks(self, blob: _Blob, asm: _Assembly) -> tuple[int, str]:
        plan = [
            (start, min(start + self.chunk_bytes, blob.size))
            for start in range(0, blob.size, self.chunk_bytes)
        ]
        todo = [(s, e) for s, e in plan if not asm.done.covers(s, e)]
        resumed = blob.size - sum(e - s for s, e in todo)
        if resumed:
            log.info("sha256:%s resuming with %d bytes already fetched", blob.sha256, resumed)
            self.progress.update(resumed)
            with self._lock:
                self.bytes_resumed += resumed
        futures: list[Future[None]] = [
            self.chunk_pool.submit(self._fetch_chunk, blob, asm, s, e) for s, e in todo
        ]
        if resumed:
            asm.catch_up()  # hash the resumed prefix while the new chunks download
        finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in finished if f.exception() is not None]
        if failed:
            self.cancel.set()  # siblings stop at their next piece; wait so the fd stays open
            wait(pending)
            raise failed[0].exception()  # type: ignore[misc]
        asm.catch_up()
        if asm.hashed != blob.size:
            raise HydrateError(f"internal: sha256:{blob.sha256} hashed {asm.hashed}/{blob.size}")
        return resumed, asm.hasher.hexdigest()

    def _fetch_chunk(self, blob: _Blob, asm: _Assembly, start: int, end: int) -> None:
        if self.cancel.is_set():
            raise _Cancelled  # queued before a failure elsewhere: do not even ask the store
        streamed = asm.claim_stream(start)
        pos = start
        attempt = 0
        while pos < end:
            try:
                for piece in self.store.read_range(blob.sha256, pos, end):
                    if self.cancel.is_set():
                        raise _Cancelled
                    if pos + len(piece) > end:
                        raise StoreError(f"{self.store.uri} sent more bytes than the range asked")
                    _pwrite_all(asm.fd, piece, pos)
                    if streamed:
                        asm.hasher.update(piece)
                    pos += len(piece)
                    with self._lock:
                        self.bytes_fetched += len(piece)
                    self.progress.update(len(piece))
                if pos < end:
                    raise StoreError(f"{self.store.uri} ended the range early at byte {pos}")
            except StoreError as exc:
                attempt += 1
                if attempt >= CHUNK_ATTEMPTS or self.cancel.is_set():
                    raise
                delay = min(4.0, 0.25 * 2**attempt)
                log.warning("%s; retrying from byte %d in %.2fs", exc, pos, delay)
                if self.cancel.wait(delay):
                    raise _Cancelled from exc
        asm.chunk_done(start, end, streamed)

    def _commit(self, blob: _Blob, actual: str) -> None:
        """Move a verified partial into ``blobs/``, or delete it and raise BlobCorruptError."""
        part = self.cache.part_path(blob.sha256)
        chunks = self.cache.chunks_path(blob.sha256)
        if actual != blob.sha256:
            part.unlink(missing_ok=True)
            chunks.unlink(missing_ok=True)
            raise BlobCorruptError(blob.paths[0], blob.sha256, actual, self.store.uri)
        final = self.cache.blob_path(blob.sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o444)  # shared by hardlinks: nobody may write through them
            os.fsync(fd)  # a cached name must never point at pages a power cut can lose
        finally:
            os.close(fd)
        os.replace(part, final)
        chunks.unlink(missing_ok=True)


# -- entry point ------------------------------------------------------------------------------


def _group_blobs(manifest: Manifest) -> list[_Blob]:
    blobs: dict[str, _Blob] = {}
    for entry in sorted(manifest.files, key=lambda e: e.path):
        blob = blobs.setdefault(entry.sha256, _Blob(entry.sha256, entry.size, []))
        blob.paths.append(entry.path)
    # Largest first, so the long transfers start early and small ones fill in around them.
    return sorted(blobs.values(), key=lambda b: (-b.size, b.sha256))


def _show_progress(progress: bool) -> bool:
    return progress and (sys.stderr.isatty() or os.environ.get(PROGRESS_ENV) == "1")


def hydrate(
    manifest: Manifest,
    to: Path,
    cache: Path,
    *,
    store: BlobStore | None = None,
    workers: int = 8,
    chunk_bytes: int = 16 << 20,
    progress: bool = True,
    read_only: bool = True,
) -> HydrateSummary:
    """Materialise every manifest file under `to`, fetching missing blobs into `cache` first.

    Blobs are fetched in `chunk_bytes` ranges by `workers` threads, verified against their
    sha256, and only then published in the cache; concurrent hydrators on one cache fetch each
    blob once. Files are hardlinked from the cache (0444) when `read_only`, or copied (0644)
    otherwise. No file is placed in `to` unless every blob verified. Raises BlobCorruptError for
    content that does not match its hash, UnsafePathError for a target symlink leading out of
    `to`, BlobMissingError / StoreError when the origin cannot deliver.
    """
    if workers < 1 or chunk_bytes < 1:
        raise ValueError("workers and chunk_bytes must be positive")
    started = time.monotonic()
    node = NodeCache(cache)
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    root = to.resolve()
    # Refuse unsafe targets before any byte is downloaded.
    for entry in manifest.files:
        target_path(root, entry.path, create=False)

    blobs = _group_blobs(manifest)
    missing = [b for b in blobs if not node.has(b.sha256, b.size)]
    fetched: set[str] = set()
    bar = _Progress(_show_progress(progress) and bool(missing), sum(b.size for b in missing))
    fetcher: _Fetcher | None = None
    # The origin is contacted only when something is missing: a warm node starts without it.
    opened = store is None and bool(missing)
    try:
        if missing:
            if store is None:
                store = open_store(manifest.store)
            with ThreadPoolExecutor(workers, thread_name_prefix="bdn-chunk") as chunk_pool:
                fetcher = _Fetcher(store, node, chunk_pool, chunk_bytes, bar)
                fetched = _fetch_all(fetcher, missing, workers)
    finally:
        bar.close()
        if opened and store is not None:
            store.close()

    for entry in manifest.files:
        dest = target_path(root, entry.path, create=True)
        blob = node.blob_path(entry.sha256)
        if not is_current(dest, blob, entry.sha256, read_only=read_only):
            place(dest, blob, entry.sha256, read_only=read_only)

    seconds = time.monotonic() - started
    bytes_fetched = fetcher.bytes_fetched if fetcher else 0
    summary = HydrateSummary(
        files=len(manifest.files),
        bytes_total=manifest.total_bytes,
        bytes_fetched=bytes_fetched,
        blobs_fetched=len(fetched),
        cache_hits=sum(1 for e in manifest.files if e.sha256 not in fetched),
        seconds=round(seconds, 3),
        throughput_mb_s=round(bytes_fetched / 1e6 / seconds, 1) if bytes_fetched else 0.0,
        bytes_resumed=fetcher.bytes_resumed if fetcher else 0,
    )
    STATS.add(
        hydrations=1,
        files=summary.files,
        bytes_fetched=summary.bytes_fetched,
        bytes_resumed=summary.bytes_resumed,
        blobs_fetched=summary.blobs_fetched,
        cache_hits=summary.cache_hits,
    )
    log.info("hydrated %s: %s", root, summary.to_json())
    return summary


def _fetch_all(fetcher: _Fetcher, blobs: list[_Blob], workers: int) -> set[str]:
    """Ensure every blob is cached; returns the shas this process fetched.

    One coordinator thread per blob in flight holds its lock and waits on its chunks, so the chunk
    pool never blocks on a lock. Each blob is first tried without waiting; blobs another process
    is already fetching go to the back of the queue and are waited for only then, so hydrators
    starting together split the blobs between them instead of queueing on the same lock. A
    corrupt blob does not stop the others (their verified content is worth caching); any other
    failure cancels everything.
    """
    fetched: set[str] = set()
    corrupt: list[BlobCorruptError] = []
    errors: list[BaseException] = []
    with ThreadPoolExecutor(min(workers, len(blobs)), thread_name_prefix="bdn-blob") as pool:
        pending = {pool.submit(fetcher.ensure, blob, block=False): blob for blob in blobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    blob = pending.pop(future)
                    try:
                        outcome = future.result()
                    except BlobCorruptError as exc:
                        STATS.add(corrupt_blobs=1)
                        corrupt.append(exc)
                        continue
                    except _Cancelled:
                        continue
                    except Exception as exc:
                        fetcher.cancel.set()
                        errors.append(exc)
                        continue
                    if outcome is None:  # busy elsewhere: wait for it after the free ones
                        pending[pool.submit(fetcher.ensure, blob, block=True)] = blob
                    elif outcome:
                        fetched.add(blob.sha256)
        except BaseException:
            fetcher.cancel.set()  # e.g. KeyboardInterrupt: stop the workers before unwinding
            raise
    if errors:
        raise errors[0]
    if corrupt:
        raise corrupt[0]
    return fetched


__all__ = [
    "STATS",
    "BlobCorruptError",
    "HydrateError",
    "HydrateStats",
    "HydrateSummary",
    "NodeCache",
    "UnsafePathError",
    "hydrate",
]
