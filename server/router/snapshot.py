"""The router's index on disk, so a restarted router resumes from where each worker's event
stream was instead of asking every worker for its whole cache.

One gzip'd JSON document, replaced atomically (write a sibling, then rename), holding for each
worker its instance id, the last event applied and its blocks as (id, parent) pairs. A worker
whose instance changed meanwhile (it restarted) or whose event ring no longer reaches back that
far answers the reconnect with a fresh snapshot of its own, so a stale file costs a resync,
never a wrong index.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


@dataclass
class WorkerSnapshot:
    instance: str
    last_event_id: int
    block_size: int
    blocks: list[tuple[int, int | None]]


def encode(workers: dict[str, WorkerSnapshot]) -> bytes:
    document: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "workers": {
            address: {
                "instance": w.instance,
                "last_event_id": w.last_event_id,
                "block_size": w.block_size,
                "blocks": w.blocks,
            }
            for address, w in workers.items()
        },
    }
    return gzip.compress(json.dumps(document, separators=(",", ":")).encode(), compresslevel=3)


def write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def read(path: Path) -> dict[str, WorkerSnapshot]:
    """The snapshot at `path`; {} when there is none. ValueError when it is unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        document = json.loads(gzip.decompress(raw))
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {document.get('version')!r}")
        return {
            address: WorkerSnapshot(
                instance=str(w["instance"]),
                last_event_id=int(w["last_event_id"]),
                block_size=int(w["block_size"]),
                blocks=[(int(h), None if p is None else int(p)) for h, p in w["blocks"]],
            )
            for address, w in document["workers"].items()
        }
    except (OSError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"router snapshot {path} is unreadable: {exc}") from exc
