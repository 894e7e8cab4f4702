"""BDN origin store, manifest and hydrator against real loopback stores (local, moto S3, HTTP).

Covers byte-identical hardlinked read-only hydration, warm-cache starts, corrupt origin content,
resume after SIGKILL, single-flight across processes, unsafe manifests and targets, and the stores'
own put/read semantics.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bdn_store_servers import MOTO_CREDENTIALS, RangeServer, moto_s3, range_server

from bisllm_bdn.hydrate import (
    STATS,
    BlobCorruptError,
    HydrateSummary,
    NodeCache,
    UnsafePathError,
    hydrate,
)
from bisllm_bdn.manifest import Manifest, ManifestError, ManifestFile
from bisllm_bdn.store import (
    BlobMissingError,
    BlobStore,
    HttpStore,
    LocalStore,
    StoreError,
    blob_key,
    open_store,
)

# Small chunks so a 3 MiB file spans many ranged requests.
CHUNK = 256 << 10
BIG = "model-00001-of-00001.safetensors"
# path -> (size, seed); the copy shares config.json's content to exercise dedup.
FILES: dict[str, tuple[int, int]] = {
    "config.json": (1_000, 1),
    BIG: (3 << 20, 2),
    "nested/deep/tokenizer.json": (300_000, 3),
    "nested/empty.txt": (0, 4),
    "nested/copy-of-config.json": (1_000, 1),
}
DISTINCT_BLOBS = 4


def _data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll `condition` until true; fail after `timeout_s` (never a blind sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


class Origin:
    """Random source files put into a LocalStore, plus manifests over them."""

    def __init__(self, root: Path) -> None:
        self.src = root / "src"
        self.store = LocalStore(root / "store")
        self.contents: dict[str, bytes] = {}
        self.entries: list[ManifestFile] = []
        for path, (size, seed) in FILES.items():
            data = _data(size, seed)
            file = self.src / path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)
            self.contents[path] = data
            self.entries.append(ManifestFile(path=path, size=size, sha256=_sha(data)))
            self.store.put_file(_sha(data), file)

    def manifest(self, store_uri: str, only: list[str] | None = None) -> Manifest:
        entries = [e for e in self.entries if only is None or e.path in only]
        return make_manifest(store_uri, entries)

    def sha(self, path: str) -> str:
        return _sha(self.contents[path])


def make_manifest(store_uri: str, files: list[ManifestFile]) -> Manifest:
    return Manifest(
        source="hf://example/tiny@0123456789abcdef0123456789abcdef01234567",
        revision="0123456789abcdef0123456789abcdef01234567",
        config_hash="sha256:" + "0" * 64,
        store=store_uri,
        mount_location="/app/model_cache/tiny",
        created_at="2025-01-01T00:00:00Z",
        files=files,
    )


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    return Origin(tmp_path)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


def _s3_store(endpoint: str, bucket: str) -> BlobStore:
    store = open_store(f"s3://{bucket}/mirror", credentials=MOTO_CREDENTIALS, endpoint_url=endpoint)
    store._client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
    return store


def _assert_hydrated(origin: Origin, to: Path, cache: Path) -> None:
    node = NodeCache(cache)
    for path, data in origin.contents.items():
        file = to / path
        assert file.read_bytes() == data, path
        st = file.stat()
        assert stat.S_IMODE(st.st_mode) == 0o444, path
        blob = node.blob_path(origin.sha(path)).stat()
        assert (st.st_dev, st.st_ino) == (blob.st_dev, blob.st_ino), f"{path} is not a hardlink"


# -- hydrate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "s3", "http"])
def test_hydrate_round_trip_and_warm_cache(
    kind: str, origin: Origin, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        store: BlobStore = origin.store
    elif kind == "s3":
        store = _s3_store(request.getfixturevalue("s3_endpoint"), "round-trip")
        for path in origin.contents:
            store.put_file(origin.sha(path), origin.src / path)
    else:
        server = RangeServer(origin.store.root).start()
        request.addfinalizer(server.stop)
        store = open_store(server.url)
    manifest = origin.manifest(store.uri)
    cache = tmp_path / "cache"

    cold = hydrate(manifest, tmp_path / "to", cache, store=store, workers=4, chunk_bytes=CHUNK)
    _assert_hydrated(origin, tmp_path / "to", cache)
    total = sum(len(d) for d in origin.contents.values())
    assert cold.files == len(FILES)
    assert cold.bytes_total == total
    assert cold.blobs_fetched == DISTINCT_BLOBS
    assert cold.bytes_fetched == total - 1_000  # the duplicate is fetched once
    assert cold.cache_hits == 0
    assert json.loads(cold.to_json())["blobs_fetched"] == DISTINCT_BLOBS
    assert not list((cache / "partial").iterdir())

    # A second replica on the same node: everything comes from the node cache.
    warm = hydrate(manifest, tmp_path / "to2", cache, store=store, chunk_bytes=CHUNK)
    assert (warm.bytes_fetched, warm.blobs_fetched, warm.cache_hits) == (0, 0, len(FILES))
    _assert_hydrated(origin, tmp_path / "to2", cache)

    # Rerunning into a complete target leaves the existing links in place.
    before = (tmp_path / "to" / BIG).stat().st_ino
    again = hydrate(manifest, tmp_path / "to", cache, store=store, chunk_bytes=CHUNK)
    assert again.bytes_fetched == 0
    assert (tmp_path / "to" / BIG).stat().st_ino == before


def test_warm_start_never_opens_the_store(origin: Origin, tmp_path: Path) -> None:
    manifest = origin.manifest(origin.store.uri)
    hydrate(manifest, tmp_path / "a", tmp_path / "cache", progress=False)  # opens file:// itself
    # The origin is unreachable now, yet a warm node still starts.
    unreachable = manifest.model_copy(update={"store": "http://127.0.0.1:9/nowhere"})
    summary = hydrate(unreachable, tmp_path / "b", tmp_path / "cache", progress=False)
    assert summary.cache_hits == len(FILES)
    assert summary.throughput_mb_s == 0.0


def test_writable_hydrate_copies_and_leaves_the_cache_alone(origin: Origin, tmp_path: Path) -> None:
    manifest = origin.manifest(origin.store.uri, only=["config.json"])
    hydrate(manifest, tmp_path / "ro", tmp_path / "cache", chunk_bytes=CHUNK)
    hydrate(manifest, tmp_path / "ro", tmp_path / "cache", read_only=False)
    file = tmp_path / "ro" / "config.json"
    blob = NodeCache(tmp_path / "cache").blob_path(origin.sha("config.json"))
    assert file.stat().st_ino != blob.stat().st_ino
    assert stat.S_IMODE(file.stat().st_mode) == 0o644
    file.write_bytes(b"edited")
    assert blob.read_bytes() == origin.contents["config.json"]
    # The edited copy no longer matches its record, so the next hydrate restores it.
    hydrate(manifest, tmp_path / "ro", tmp_path / "cache", read_only=False)
    assert file.read_bytes() == origin.contents["config.json"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_corrupt_origin_blob_is_never_cached_or_linked(
    kind: str, origin: Origin, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sha = origin.sha(BIG)
    bad = bytearray(origin.contents[BIG])
    bad[len(bad) // 2 : len(bad) // 2 + 16] = b"\xff" * 16  # same size, different bytes
    if kind == "local":
        store: BlobStore = origin.store
        blob = origin.store.path(sha)
        blob.chmod(0o644)
        blob.write_bytes(bytes(bad))
    else:
        store = _s3_store(request.getfixturevalue("s3_endpoint"), "corrupt")
        for path in origin.contents:
            store.put_file(origin.sha(path), origin.src / path)
        store._client.put_object(  # type: ignore[attr-defined]
            Bucket="corrupt",
            Key=store.key(sha),
            Body=bytes(bad),  # type: ignore[attr-defined]
        )
    before = STATS.snapshot()["corrupt_blobs"]
    with pytest.raises(BlobCorruptError) as info:
        hydrate(
            origin.manifest(store.uri),
            tmp_path / "to",
            tmp_path / "cache",
            store=store,
            workers=4,
            chunk_bytes=CHUNK,
        )
    err = info.value
    assert (err.path, err.expected, err.actual) == (BIG, sha, _sha(bytes(bad)))
    assert BIG in str(err) and sha in str(err)
    assert not (tmp_path / "to" / BIG).exists()
    assert not NodeCache(tmp_path / "cache").blob_path(sha).exists()
    assert not list((tmp_path / "cache" / "partial").iterdir())
    assert STATS.snapshot()["corrupt_blobs"] == before + 1
    # No file of a failed hydrate reaches the target; the verified blobs stay cached.
    assert not any(p.is_file() for p in (tmp_path / "to").rglob("*"))
    assert NodeCache(tmp_path / "cache").has(origin.sha("config.json"), 1_000)


def test_missing_origin_blob_fails_cleanly(origin: Origin, tmp_path: Path) -> None:
    sha = origin.sha("nested/deep/tokenizer.json")
    origin.store.path(sha).unlink()
    with pytest.raises(BlobMissingError) as info:
        hydrate(origin.manifest(origin.store.uri), tmp_path / "to", tmp_path / "cache")
    assert sha in str(info.value)
    assert not any(p.is_file() for p in (tmp_path / "to").rglob("*"))


def test_transient_http_errors_are_retried(origin: Origin, tmp_path: Path) -> None:
    with range_server(origin.store.root) as server:
        server.fail_next = 2
        manifest = origin.manifest(server.url, only=[BIG])
        summary = hydrate(manifest, tmp_path / "to", tmp_path / "cache", chunk_bytes=CHUNK)
    assert summary.bytes_fetched == 3 << 20
    assert (tmp_path / "to" / BIG).read_bytes() == origin.contents[BIG]
    assert len(server.gets()) == 12 + 2


# -- crash resume and single flight (real processes) -------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from bisllm_bdn.hydrate import hydrate
    from bisllm_bdn.manifest import Manifest

    manifest, to, cache, chunk, workers, barrier = sys.argv[1:7]
    manifest = Manifest.load(Path(manifest))
    if barrier != "-":
        Path(barrier, f"ready-{os.getpid()}").touch()
        deadline = time.monotonic() + 30
        while not Path(barrier, "go").exists():
            if time.monotonic() > deadline:
                sys.exit("no go signal")
            time.sleep(0.002)
    summary = hydrate(manifest, Path(to), Path(cache), workers=int(workers),
                      chunk_bytes=int(chunk), progress=False)
    print(summary.to_json())
    """
)


def _child(
    manifest: Path, to: Path, cache: Path, *, workers: int, barrier: Path | None = None
) -> subprocess.Popen[str]:
    args = [str(manifest), str(to), str(cache), str(CHUNK), str(workers), str(barrier or "-")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_resume_after_sigkill_refetches_only_missing_chunks(origin: Origin, tmp_path: Path) -> None:
    size = 3 << 20
    done_bytes = 4 * CHUNK
    cache = tmp_path / "cache"
    with range_server(origin.store.root) as server:
        manifest_path = tmp_path / "manifest.json"
        origin.manifest(server.url, only=[BIG]).dump(manifest_path)
        # Chunks 0-3 are served; later ranges hang until released, so the kill lands mid-blob.
        server.hold(done_bytes)
        proc = _child(manifest_path, tmp_path / "to", cache, workers=2)
        sidecar = NodeCache(cache).chunks_path(origin.sha(BIG))

        def first_chunks_recorded() -> bool:
            assert proc.poll() is None, proc.communicate()
            lines = sidecar.read_text().splitlines() if sidecar.exists() else []
            finished = {tuple(map(int, line.split())) for line in lines}
            return all((i * CHUNK, (i + 1) * CHUNK) in finished for i in range(4))

        _wait_for(first_chunks_recorded, "the first four chunks to be recorded")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        server.release()
        assert not (tmp_path / "to" / BIG).exists()
        first_run = {r.start for r in server.gets()}
        assert set(range(0, done_bytes, CHUNK)) <= first_run
        server.clear()

        summary = hydrate(
            Manifest.load(manifest_path), tmp_path / "to", cache, workers=2, chunk_bytes=CHUNK
        )
        second_run = sorted(r.start for r in server.gets())
    assert second_run == list(range(done_bytes, size, CHUNK))
    assert summary.bytes_resumed == done_bytes
    assert summary.bytes_fetched == size - done_bytes
    assert (tmp_path / "to" / BIG).read_bytes() == origin.contents[BIG]
    assert not list((cache / "partial").iterdir())


def test_single_flight_four_processes_fetch_each_blob_once(origin: Origin, tmp_path: Path) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    cache = tmp_path / "cache"
    with range_server(origin.store.root) as server:
        server.delay_s = 0.01  # keep transfers in flight long enough for the others to collide
        manifest_path = tmp_path / "manifest.json"
        origin.manifest(server.url).dump(manifest_path)
        procs = [
            _child(manifest_path, tmp_path / f"to{i}", cache, workers=3, barrier=barrier)
            for i in range(4)
        ]
        _wait_for(lambda: len(list(barrier.glob("ready-*"))) == 4, "4 hydrators to be ready")
        (barrier / "go").touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
        gets = server.gets()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    summaries = [HydrateSummary(**json.loads(out)) for out, _ in outputs]
    assert sum(s.blobs_fetched for s in summaries) == DISTINCT_BLOBS
    assert sum(s.bytes_fetched for s in summaries) == sum(
        len(origin.contents[p]) for p in FILES if p != "nested/copy-of-config.json"
    )
    # Every (blob, range) went over the wire exactly once across all four processes.
    counts = Counter((r.path, r.start) for r in gets)
    assert counts and set(counts.values()) == {1}
    for i in range(4):
        _assert_hydrated(origin, tmp_path / f"to{i}", cache)


# -- unsafe manifests and targets --------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["../escape.bin", "/etc/passwd", "a/../../b", "a//b", "./a", "a/", "a\\b", "a\x00b", ""],
)
def test_manifest_rejects_unsafe_paths(bad: str, tmp_path: Path) -> None:
    data = json.loads(make_manifest("file:///store", []).canonical_json())
    data["files"] = [{"path": bad, "size": 1, "sha256": "a" * 64}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        Manifest.load(path)
    assert str(path) in str(info.value)
    if bad:
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([("w.bin", "a"), ("w.bin", "a")], "'w.bin' is listed more than once"),
        ([("w", "a"), ("w/x.bin", "b")], "'w' is also the directory of another file"),
        ([("a.bin", "a"), ("b.bin", "A")], "files.1.sha256"),
    ],
)
def test_manifest_rejects_inconsistent_files(
    files: list[tuple[str, str]], message: str, tmp_path: Path
) -> None:
    data = json.loads(make_manifest("file:///store", []).canonical_json())
    data["files"] = [{"path": p, "size": 1, "sha256": c * 64} for p, c in files]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(path)


def test_manifest_dump_is_canonical_and_round_trips(origin: Origin, tmp_path: Path) -> None:
    manifest = origin.manifest(origin.store.uri)
    shuffled = manifest.model_copy(update={"files": list(reversed(manifest.files))})
    manifest.dump(tmp_path / "a.json")
    shuffled.dump(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    loaded = Manifest.load(tmp_path / "a.json")
    assert [f.path for f in loaded.files] == sorted(FILES)
    assert loaded.canonical_json() == manifest.canonical_json()
    assert not list(tmp_path.glob(".*.tmp"))


def test_symlink_escaping_the_target_is_refused(origin: Origin, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    to = tmp_path / "to"
    (to / "nested").mkdir(parents=True)
    (to / "nested" / "deep").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside the target"):
        hydrate(origin.manifest(origin.store.uri), to, tmp_path / "cache")
    assert not list(outside.iterdir())
    # Refused before anything was downloaded.
    assert not list((tmp_path / "cache" / "blobs" / "sha256").iterdir())

    # A file symlink at the leaf pointing outside is refused too.
    (to / "nested" / "deep").unlink()
    (to / "config.json").symlink_to(outside / "victim")
    with pytest.raises(UnsafePathError, match=r"config\.json"):
        hydrate(origin.manifest(origin.store.uri), to, tmp_path / "cache")
    assert not (outside / "victim").exists()


def test_symlink_inside_the_target_is_followed(origin: Origin, tmp_path: Path) -> None:
    to = tmp_path / "to"
    (to / "real").mkdir(parents=True)
    (to / "nested").symlink_to(to / "real")
    hydrate(origin.manifest(origin.store.uri), to, tmp_path / "cache")
    assert (to / "real" / "deep" / "tokenizer.json").read_bytes() == origin.contents[
        "nested/deep/tokenizer.json"
    ]


# -- stores -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_put_file_skips_existing_blobs(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data = _data(200_000, 9)
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    if kind == "local":
        store: BlobStore = open_store(str(tmp_path / "store"))
        assert isinstance(store, LocalStore)
    else:
        store = _s3_store(request.getfixturevalue("s3_endpoint"), "put-twice")
    sha = _sha(data)
    assert not store.has(sha)
    assert store.put_file(sha, src) is True
    assert store.put_file(sha, src) is False
    assert store.has(sha) and store.size(sha) == len(data)
    assert b"".join(store.read_range(sha, 1000, 150_000)) == data[1000:150_000]
    assert b"".join(store.read_range(sha, 5, 5)) == b""
    missing = "f" * 64
    with pytest.raises(BlobMissingError):
        store.size(missing)
    with pytest.raises(BlobMissingError):
        b"".join(store.read_range(missing, 0, 10))


def test_store_uris_and_read_only_http(origin: Origin, tmp_path: Path) -> None:
    assert isinstance(open_store(origin.store.uri), LocalStore)
    assert open_store(origin.store.uri).root == origin.store.root  # type: ignore[attr-defined]
    assert blob_key("ab" + "0" * 62) == "blobs/sha256/ab/ab" + "0" * 62
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("ftp://example/x")
    with pytest.raises(ValueError, match="sha256"):
        origin.store.has("../../etc/passwd")
    with range_server(origin.store.root) as server:
        store = open_store(server.url + "/")
        assert isinstance(store, HttpStore)
        sha = origin.sha(BIG)
        assert store.has(sha) and store.size(sha) == 3 << 20
        assert not store.has("0" * 64)
        with pytest.raises(StoreError, match="read-only"):
            store.put_file(sha, origin.src / BIG)


def test_s3_errors_name_the_store_not_the_secret(s3_endpoint: str) -> None:
    store = open_store(
        "s3://no-such-bucket/p", credentials=MOTO_CREDENTIALS, endpoint_url=s3_endpoint
    )
    with pytest.raises(StoreError) as info:
        b"".join(store.read_range("a" * 64, 0, 10))
    assert "s3://no-such-bucket/p" in str(info.value)
    assert MOTO_CREDENTIALS["aws_secret_access_key"] not in str(info.value)


_PUT_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bisllm_bdn.store import open_store

    root, sha, src, barrier = sys.argv[1:5]
    deadline = time.monotonic() + 30
    while not Path(barrier).exists():
        if time.monotonic() > deadline:
            sys.exit("no go signal")
        time.sleep(0.002)
    print(open_store(root).put_file(sha, Path(src)))
    """
)


def test_concurrent_put_file_of_one_blob_is_safe(tmp_path: Path) -> None:
    data = _data(4 << 20, 11)
    sha = _sha(data)
    src = tmp_path / "w.bin"
    src.write_bytes(data)
    root = tmp_path / "store"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PUT_CHILD, str(root), sha, str(src), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    # Also race threads in this process against them.
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(LocalStore(root).put_file(sha, src)))
        for _ in range(2)
    ]
    go.touch()
    for thread in threads:
        thread.start()
    outputs = [proc.communicate(timeout=60) for proc in procs]
    for thread in threads:
        thread.join()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    results += [out.strip() == "True" for out, _ in outputs]
    assert results.count(True) >= 1
    blob = root / blob_key(sha)
    assert _sha(blob.read_bytes()) == sha
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert [p.name for p in blob.parent.iterdir()] == [sha]  # no temporary files left


def test_progress_bar_is_quiet_unless_forced(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    manifest = origin.manifest(origin.store.uri, only=["config.json"])
    hydrate(manifest, tmp_path / "a", tmp_path / "c1")
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    monkeypatch.setenv("BISLLM_BDN_PROGRESS", "1")
    hydrate(manifest, tmp_path / "b", tmp_path / "c2")
    assert "hydrate" in capsys.readouterr().err
