"""Mirror: copy every file of a `weights` source into the content-addressed origin store and
write its manifest (path, size, sha256, source etag, pinned revision, config hash).

A file is keyed by its sha256, which needs its bytes; so to send nothing twice the previous
manifest of the same source is consulted first: a file whose path, size and source etag are
unchanged, and whose blob is still in the store, keeps its recorded hash without being read
again (BDN's etag dedup). Everything else streams through a hash into a temporary file and is
uploaded only when the store lacks that blob, so identical files are stored once and
concurrent mirrors of the same content only ever write identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bisllm_bdn.auth import SecretStore
from bisllm_bdn.manifest import Manifest, ManifestError, ManifestFile
from bisllm_bdn.sources import Endpoints, Source, open_source
from bisllm_bdn.store import BlobStore

COPY_CHUNK = 8 << 20


@dataclass
class MirrorResult:
    manifest: Manifest
    manifest_path: Path
    files: int
    bytes_total: int
    bytes_read: int  # read from the source (0 when every etag matched the last manifest)
    bytes_sent: int  # uploaded to the store (0 when every blob was already there)
    blobs_sent: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.manifest.source,
            "revision": self.manifest.revision,
            "manifest": str(self.manifest_path),
            "files": self.files,
            "bytes_total": self.bytes_total,
            "bytes_read": self.bytes_read,
            "bytes_sent": self.bytes_sent,
            "blobs_sent": self.blobs_sent,
            "seconds": round(self.seconds, 3),
        }


def config_hash(mount: Any) -> str:
    """Hash of the fields whose change triggers a re-mirror: source, patterns and auth (not
    `mount_location`), as BDN documents."""
    fields = {
        "source": mount.source,
        "allow_patterns": mount.allow_patterns,
        "ignore_patterns": mount.ignore_patterns,
        "auth": mount.auth,
        "secret_name": mount.secret_name,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_name(mount_location: str) -> str:
    """A file name for a mount's manifest: `/models/checkpoint` -> `models-checkpoint.json`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", mount_location.strip("/")) or "root"
    return f"{slug}.json"


def _previous(path: Path, digest: str, revision: str | None) -> dict[str, ManifestFile]:
    """The last manifest's entries by path, if it describes the same source state."""
    if not path.is_file():
        return {}
    try:
        old = Manifest.load(path)
    except ManifestError:
        return {}
    if old.config_hash != digest or old.revision != revision:
        return {}
    return {f.path: f for f in old.files}


def _hash_to_temp(source: Source, path: str, directory: Path) -> tuple[str, Path, int]:
    """(sha256, temporary file, size) of one source file, streamed once."""
    digest = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mirror-")
    try:
        with os.fdopen(fd, "wb") as out, source.open(path) as stream:
            while chunk := stream.read(COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest(), Path(tmp), size


def mirror_mount(
    mount: Any,
    store: BlobStore,
    manifest_dir: Path,
    *,
    secrets: SecretStore | None = None,
    base_dir: Path | None = None,
    endpoints: Endpoints | None = None,
    work_dir: Path | None = None,
) -> MirrorResult:
    """Mirror one `weights` mount (a spec WeightsMount) into `store`; write and return its
    manifest under `manifest_dir`."""
    start = time.perf_counter()
    source = open_source(
        mount.source,
        auth=mount.auth,
        secret_name=mount.secret_name,
        secrets=secrets,
        allow_patterns=mount.allow_patterns,
        ignore_patterns=mount.ignore_patterns,
        base_dir=base_dir,
        endpoints=endpoints,
    )
    revision = source.pin()
    digest = config_hash(mount)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = manifest_dir / manifest_name(mount.mount_location)
    known = _previous(manifest_path, digest, revision)
    scratch = Path(work_dir or manifest_dir)
    entries: list[ManifestFile] = []
    bytes_read = bytes_sent = blobs_sent = 0
    for remote in source.list_files():
        old = known.get(remote.path)
        reusable = (
            old is not None
            and remote.etag is not None
            and old.etag == remote.etag
            and old.size == remote.size
            and store.has(old.sha256)
        )
        if reusable:
            assert old is not None
            entries.append(old)
            continue
        sha, tmp, size = _hash_to_temp(source, remote.path, scratch)
        try:
            bytes_read += size
            if store.put_file(sha, tmp):
                bytes_sent += size
                blobs_sent += 1
        finally:
            tmp.unlink(missing_ok=True)
        entries.append(ManifestFile(path=remote.path, size=size, sha256=sha, etag=remote.etag))
    manifest = Manifest(
        source=mount.source,
        revision=revision,
        config_hash=digest,
        store=store.uri,
        mount_location=mount.mount_location,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=entries,
    )
    manifest.dump(manifest_path)
    return MirrorResult(
        manifest=manifest,
        manifest_path=manifest_path,
        files=len(entries),
        bytes_total=sum(f.size for f in entries),
        bytes_read=bytes_read,
        bytes_sent=bytes_sent,
        blobs_sent=blobs_sent,
        seconds=time.perf_counter() - start,
    )
