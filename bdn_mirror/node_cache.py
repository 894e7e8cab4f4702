"""The node cache directory (the GPU-local tier) that every hydrator process on a node shares.

* ``blobs/sha256/<2 hex>/<sha256>``: verified blobs, mode 0444. Only a blob whose sha256 was
  checked ever gets a name here, so presence plus the right size is a cache hit.
* ``partial/<sha256>.part``: a blob being assembled, preallocated to its full size; chunks are
  written in place with ``pwrite``.
* ``partial/<sha256>.chunks``: one ``<start> <end>`` line per finished chunk, appended after the
  chunk's bytes are written, so a rerun after a crash or SIGKILL fetches only what is missing.
* ``locks/<sha256>.lock``: ``flock`` single-flight locks. Whoever holds one is the only process
  fetching that blob; the others wait, then find it in ``blobs/``. The kernel drops the lock
  when its holder dies. Lock files are never deleted (deleting one under a waiter would split
  the lock in two); they are empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from bisllm_bdn.store import blob_key


class NodeCache:
    """Paths and locks of the node cache directory (layout in the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        for sub in ("blobs/sha256", "partial", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    def part_path(self, sha256: str) -> Path:
        return self.root / "partial" / f"{sha256}.part"

    def chunks_path(self, sha256: str) -> Path:
        return self.root / "partial" / f"{sha256}.chunks"

    def lock_path(self, sha256: str) -> Path:
        return self.root / "locks" / f"{sha256}.lock"

    def has(self, sha256: str, size: int) -> bool:
        """Whether a verified blob of this size is cached."""
        try:
            return self.blob_path(sha256).stat().st_size == size
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def locked(self, sha256: str, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the blob's exclusive single-flight lock; yields False if `blocking` is off and
        another holder has it."""
        fd = os.open(self.lock_path(sha256), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the flock


class Intervals:
    """A set of byte ranges [start, end), kept merged and sorted."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> None:
        spans = sorted([*self.spans, (start, end)])
        merged: list[tuple[int, int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.spans = merged

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self.spans)

    def prefix_end(self) -> int:
        """End of the covered range that starts at byte 0 (0 when byte 0 is not covered)."""
        return self.spans[0][1] if self.spans and self.spans[0][0] == 0 else 0


def read_chunk_records(path: Path, size: int) -> Intervals:
    """Finished ranges from a ``.chunks`` sidecar; a torn or bogus line is ignored."""
    done = Intervals()
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return done
    # Only newline-terminated lines were written completely.
    for line in text.split("\n")[:-1]:
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            start, end = int(fields[0]), int(fields[1])
            if 0 <= start < end <= size:
                done.add(start, end)
    return done
