"""Loopback servers for the BDN tests: S3 (moto), a Range-capable file server, a fake HF hub.

Everything listens on 127.0.0.1 with a kernel-chosen port and runs in daemon threads; nothing
leaves the machine. Each server is a context manager, and a function-scoped pytest fixture
wraps each one. Load the fixtures with ``pytest_plugins = ["bdn_servers"]`` in the test module
(pytest then imports this module itself and rewrites its asserts; import the classes only
under TYPE_CHECKING, or pytest warns that it cannot rewrite an already imported module):

    moto_s3()                 fixture moto_s3_server    -> MotoS3
    range_http_server(root)   fixture range_server      -> RangeServer over tmp_path / "www"
    fake_hub()                fixture fake_hub_server   -> FakeHub

* ``moto_s3() -> MotoS3``: moto's S3 (and IAM) server. ``.endpoint``; ``.client(service)``
  (boto3, dummy keys); ``.put_files(bucket, {key: bytes})``; ``.secret`` (the dummy keys in the
  BDN S3 secret format); ``with .require_auth() as secret:`` switches moto's IAM checks on and
  yields the only key pair that works (other keys get InvalidAccessKeyId or
  SignatureDoesNotMatch). Moto's state is global to the process: leaving the context resets it.
* ``range_http_server(root, require_token=None) -> RangeServer``: serves the files under
  `root` with ``Range: bytes=a-b|a-|-n`` (206 + Content-Range; 416 + ``bytes */size`` on an
  unsatisfiable or malformed range, and on multi-range requests), ETag and Content-Length on
  HEAD and GET. ``.requests`` logs (method, path, range, status). ``.cut_after(n)`` makes the
  next GET send its full headers and only `n` body bytes, then drop the connection (resume
  tests); ``.fail_with(status)`` answers the next request with an error status;
  ``.honor_ranges = False`` makes it ignore Range headers (200, whole body). With
  `require_token` (an attribute too, settable at any time), requests need
  ``Authorization: Bearer <token>`` (401 without it, 403 with another token).
* ``fake_hub(page_size=1000, port=0, cdn_port=0) -> FakeHub``: just the Hugging Face Hub routes
  huggingface_hub 2.x calls for ``HfApi.model_info(revision=)``, ``HfApi.list_repo_tree(
  recursive=True)`` (with Link-header paging), and ``hf_hub_download`` / ``snapshot_download``:
  HEAD and GET of ``/{repo}/resolve/{rev}/{path}`` carry ``X-Repo-Commit``, an ``ETag`` (the git
  blob id; an LFS file's sha256) and ``Content-Length``; LFS files (by suffix) answer 302 with
  ``X-Linked-Etag`` and ``X-Linked-Size`` and a ``Location`` on ``.cdn_url``: a second loopback
  port, so another origin, as the hub's CDN is another host (huggingface_hub stops at the
  redirect and reads the metadata off it; clients drop the Authorization header there). The
  ``/cdn/`` route honors Range. Tree entries give an LFS file's pointer blob id as ``oid``.
  ``.add_repo(repo_id, token=None)``, then ``repo.commit({path: bytes or Path})`` hashes each
  file once, returns the new commit's sha and moves the branch; a Path is served from disk at
  each request (``directory_files(root)`` maps a folder). Private repos answer 401 like the hub.

Run as a script, the fake hub serves a directory from its own process until interrupted or
terminated, and prints its URL on stdout once the files are hashed and it is ready:

    python tests/bdn_servers.py fake-hub --root DIR --repo acme/shards [--port 0] [--token T]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

DUMMY_KEY = "testing"  # moto accepts any key pair until require_auth() is on
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_HASH_BLOCK = 1 << 20  # bytes read at a time when hashing a file on disk


# ---------------------------------------------------------------------------------------------
# S3 (moto)


@dataclass
class MotoS3:
    """A running moto server; see the module docstring."""

    endpoint: str
    region: str = "us-east-1"

    def client(
        self, service: str = "s3", *, access_key: str = DUMMY_KEY, secret_key: str = DUMMY_KEY
    ) -> Any:
        return boto3.session.Session().client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
        )

    @property
    def secret(self) -> dict[str, str]:
        """The dummy keys as a BDN S3 secret (write it with json.dumps)."""
        return {"aws_access_key_id": DUMMY_KEY, "aws_secret_access_key": DUMMY_KEY}

    def put_files(self, bucket: str, files: Mapping[str, bytes]) -> None:
        """Create `bucket` (if needed) and upload each key's bytes."""
        s3 = self.client()
        if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=bucket)
        for key, data in files.items():
            s3.put_object(Bucket=bucket, Key=key, Body=data)

    @contextmanager
    def require_auth(self) -> Iterator[dict[str, str]]:
        """Enforce IAM inside the block; yields the one S3 secret (dict) that is accepted."""
        iam = self.client("iam")
        user = f"bdn-reader-{len(iam.list_users()['Users'])}"
        iam.create_user(UserName=user)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}],
        }
        iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        # moto authenticates every request after this many unauthenticated ones: 0 from now on.
        httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
        try:
            yield {
                "aws_access_key_id": key["AccessKeyId"],
                "aws_secret_access_key": key["SecretAccessKey"],
            }
        finally:
            httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """Start moto on 127.0.0.1 (a free port); reset its global state when done."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        yield MotoS3(endpoint=endpoint)
    finally:
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"inf")
        httpx.post(f"{endpoint}/moto-api/reset")
        server.stop()


@pytest.fixture
def moto_s3_server() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


# ---------------------------------------------------------------------------------------------
# Shared HTTP plumbing: request log, fault injection, byte serving with Range


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # as requested, query string included
    range: str | None
    status: int


@dataclass
class _Fault:
    kind: str  # "cut" (drop the connection after `value` body bytes) or "status"
    value: int
    path: str | None
    times: int


class _HttpServerBase:
    """Threads, request log and injected faults shared by the range server and the fake hub."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[RequestRecord] = []
        self.honor_ranges = True  # False: answer 200 with the whole body, as some servers do
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._listeners: list[tuple[ThreadingHTTPServer, threading.Thread]] = []
        self.url = self._listen(port)

    def _listen(self, port: int) -> str:
        """Listen on a (further) loopback port with the same handler; returns its URL."""
        httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        self._listeners.append((httpd, thread))
        host, bound = httpd.server_address[:2]
        return f"http://{host}:{bound}"

    def start(self) -> None:
        for _, thread in self._listeners:
            thread.start()

    def stop(self) -> None:
        for httpd, thread in self._listeners:
            httpd.shutdown()
            httpd.server_close()
            thread.join()

    def cut_after(self, nbytes: int, *, path: str | None = None, times: int = 1) -> None:
        """The next `times` GETs (of `path`, if given) stop after `nbytes` body bytes."""
        with self._lock:
            self._faults.append(_Fault("cut", nbytes, path, times))

    def fail_with(self, status: int, *, path: str | None = None, times: int = 1) -> None:
        """The next `times` requests (of `path`, if given) get `status` and an empty body."""
        with self._lock:
            self._faults.append(_Fault("status", status, path, times))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()

    def _take_fault(self, kind: str, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind != kind or (fault.path is not None and fault.path != path):
                    continue
                if kind == "cut" and method != "GET":
                    continue
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault.value
        return None

    def _record(self, handler: BaseHTTPRequestHandler, status: int) -> None:
        record = RequestRecord(handler.command, handler.path, handler.headers.get("Range"), status)
        with self._lock:
            self.requests.append(record)

    def _handle(self, handler: _Handler) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _handler_class(self) -> type[_Handler]:
        server = self

        class Handler(_Handler):
            owner = server

        return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every response carries Content-Length
    owner: _HttpServerBase

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        return None  # quiet: the tests read `requests` instead

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        status = self.owner._take_fault("status", self.command, path)
        if status is not None:
            self.reply(status)
            return
        self.owner._handle(self)

    def reply(
        self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> None:
        self.owner._record(self, status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_bytes(
        self, size: int, body: bytes | Path, etag: str, extra: Mapping[str, str] | None = None
    ) -> None:
        """Serve `body` (bytes, or a file of `size` bytes) honoring a single Range; `extra`
        headers go with it. A file is opened per request and sent with sendfile."""
        headers = {**(extra or {}), "ETag": etag, "Accept-Ranges": "bytes"}
        start, end, status = 0, size - 1, 200
        requested = self.headers.get("Range") if self.owner.honor_ranges else None
        if requested is not None:
            parsed = _parse_range(requested, size)
            if parsed is None:
                self.reply(416, headers={**headers, "Content-Range": f"bytes */{size}"})
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self.owner._record(self, status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = self.owner._take_fault("cut", self.command, urlsplit(self.path).path)
        count = length if cut is None else min(cut, length)
        if not isinstance(body, Path):
            self.wfile.write(memoryview(body)[start : start + count])
        elif count:
            with body.open("rb") as handle:
                self.connection.sendfile(handle, start, count)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True  # the client sees EOF before Content-Length bytes


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range, or None when it cannot be served."""
    match = _RANGE.match(value.strip())
    if not match or not (match[1] or match[2]):
        return None
    if not match[1]:  # suffix: the last n bytes
        n = int(match[2])
        return (max(size - n, 0), size - 1) if n and size else None
    first = int(match[1])
    last = min(int(match[2]), size - 1) if match[2] else size - 1
    if first >= size or last < first:
        return None
    return first, last


# ---------------------------------------------------------------------------------------------
# Range file server


class RangeServer(_HttpServerBase):
    """Serves `root` over HTTP; see the module docstring."""

    def __init__(self, root: Path, require_token: str | None = None):
        self.root = root.resolve()
        self.require_token = require_token
        super().__init__()

    def url_for(self, relative: str) -> str:
        return f"{self.url}/{quote(relative)}"

    def _handle(self, handler: _Handler) -> None:
        if self.require_token is not None:
            given = handler.headers.get("Authorization")
            if given is None:
                handler.reply(401, headers={"WWW-Authenticate": "Bearer"})
                return
            if given != f"Bearer {self.require_token}":
                handler.reply(403)
                return
        target = (self.root / unquote(urlsplit(handler.path).path).lstrip("/")).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            handler.reply(404)
            return
        stat = target.stat()
        handler.send_bytes(stat.st_size, target, f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')


@contextmanager
def range_http_server(root: Path, *, require_token: str | None = None) -> Iterator[RangeServer]:
    server = RangeServer(root, require_token)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def range_server(tmp_path: Path) -> Iterator[RangeServer]:
    """A RangeServer over a fresh `tmp_path / "www"` folder (write files into `.root`)."""
    root = tmp_path / "www"
    root.mkdir()
    with range_http_server(root) as server:
        yield server


# ---------------------------------------------------------------------------------------------
# Fake Hugging Face Hub

_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_LFS_SPEC = "https://git-lfs.github.com/spec/v1"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """A committed file and what the hub tells of it, computed once when it is committed."""

    body: bytes | Path  # a Path is read from disk at each request and must not change
    size: int
    sha256: str
    oid: str  # git blob id: of the bytes, or for an LFS file of its pointer file
    pointer_size: int | None  # LFS files only: the size of their pointer file

    @property
    def lfs(self) -> bool:
        return self.pointer_size is not None


def _hub_file(path: str, body: bytes | Path) -> HubFile:
    """Hash `body` in one pass: sha256, and the git blob id unless the file is stored in LFS."""
    size = body.stat().st_size if isinstance(body, Path) else len(body)
    lfs = path.endswith(_LFS_SUFFIXES)
    sha256 = hashlib.sha256()
    blob = None if lfs else hashlib.sha1(b"blob %d\0" % size)
    for block in _blocks(body):
        sha256.update(block)
        if blob is not None:
            blob.update(block)
    digest = sha256.hexdigest()
    if blob is not None:
        return HubFile(body, size, digest, blob.hexdigest(), None)
    pointer = f"version {_LFS_SPEC}\noid sha256:{digest}\nsize {size}\n".encode()
    return HubFile(body, size, digest, _git_blob_id(pointer), len(pointer))


def _blocks(body: bytes | Path) -> Iterator[bytes | memoryview]:
    if not isinstance(body, Path):
        yield memoryview(body)
        return
    with body.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            yield block


def directory_files(root: Path) -> dict[str, Path]:
    """{relative path: file} for every file under `root`, to commit files served from disk."""
    root = root.resolve()
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class FakeRepo:
    """A model repo: commits are full snapshots ({path: bytes or Path}); branches point at
    commits. `index` holds each commit's HubFiles, `blobs` every committed file by sha256."""

    repo_id: str
    token: str | None = None  # set: the repo is private and needs this bearer token
    commits: dict[str, dict[str, bytes | Path]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    index: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    blobs: dict[str, HubFile] = field(default_factory=dict)

    def commit(self, files: Mapping[str, bytes | Path], *, branch: str = "main") -> str:
        """Record a snapshot, point `branch` at it, and return its 40-hex sha. Each file is
        hashed here, once; a Path is served from disk later, so it must stay as it is."""
        hashed = {path: _hub_file(path, files[path]) for path in sorted(files)}
        digest = hashlib.sha1(self.branches.get(branch, "").encode())
        for path, entry in hashed.items():
            digest.update(path.encode() + b"\0" + bytes.fromhex(entry.sha256))
        sha = digest.hexdigest()
        # Index and blobs first: a request that sees the commit finds its files.
        self.index[sha] = hashed
        for entry in hashed.values():
            self.blobs.setdefault(entry.sha256, entry)
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


class FakeHub(_HttpServerBase):
    """The few Hub routes huggingface_hub uses to resolve, list and download; see the docstring."""

    def __init__(self, page_size: int = 1000, *, port: int = 0, cdn_port: int = 0):
        self.repos: dict[str, FakeRepo] = {}
        self.page_size = page_size  # tree entries per page; small values exercise Link paging
        super().__init__(port)
        # LFS downloads redirect to another origin, as on the hub, whose CDN is another host.
        self.cdn_url = self._listen(cdn_port)

    def add_repo(self, repo_id: str, *, token: str | None = None) -> FakeRepo:
        repo = FakeRepo(repo_id, token)
        self.repos[repo_id] = repo
        return repo

    def _handle(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        # Split the raw path: revisions arrive percent-encoded ("refs%2Fpr%2F1") and must stay
        # one segment until split.
        segments = [unquote(s) for s in parts.path.strip("/").split("/")]
        query = parse_qs(parts.query)
        if segments[:1] == ["cdn"] and len(segments) == 2:
            self._cdn(handler, segments[1])
        elif segments[:2] == ["api", "models"] and len(segments) >= 6:
            repo = self._repo(handler, "/".join(segments[2:4]))
            if repo is None:
                return
            if segments[4] == "revision" and len(segments) == 6:
                self._model_info(handler, repo, segments[5])
            elif segments[4] == "tree":
                self._tree(handler, repo, segments[5], "/".join(segments[6:]), query)
            else:
                handler.reply(404)
        elif len(segments) >= 5 and segments[2] == "resolve":
            repo = self._repo(handler, "/".join(segments[:2]))
            if repo is not None:
                self._resolve(handler, repo, segments[3], "/".join(segments[4:]))
        else:
            handler.reply(404)

    def _error(
        self,
        handler: _Handler,
        status: int,
        code: str,
        message: str,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        headers = {**(extra or {}), "X-Error-Code": code, "X-Error-Message": message}
        body = json.dumps({"error": message}).encode()
        handler.reply(status, body, {**headers, "Content-Type": "application/json"})

    def _json(self, handler: _Handler, data: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        handler.reply(200, body, {"Content-Type": "application/json", **(headers or {})})

    def _repo(self, handler: _Handler, repo_id: str) -> FakeRepo | None:
        repo = self.repos.get(repo_id)
        given = handler.headers.get("Authorization")
        if repo is None or (repo.token is not None and given is None):
            # The hub hides private repos: "not found" as 401, exactly as for missing ones.
            self._error(handler, 401, "RepoNotFound", "Repository not found")
            return None
        if repo.token is not None and given != f"Bearer {repo.token}":
            self._error(handler, 401, "RepoNotFound", "Invalid credentials in Authorization header")
            return None
        return repo

    def _commit(self, handler: _Handler, repo: FakeRepo, revision: str) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    def _model_info(self, handler: _Handler, repo: FakeRepo, revision: str) -> None:
        sha = self._commit(handler, repo, revision)
        if sha is not None:
            siblings = [{"rfilename": p} for p in sorted(repo.index[sha])]
            info = {"id": repo.repo_id, "sha": sha, "private": repo.token is not None}
            self._json(handler, {**info, "siblings": siblings})

    def _tree(
        self, handler: _Handler, repo: FakeRepo, revision: str, folder: str, query: dict
    ) -> None:
        sha = self._commit(handler, repo, revision)
        if sha is None:
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries = self._entries(repo.index[sha], folder, recursive)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + self.page_size]
        headers = {}
        if start + self.page_size < len(entries):
            params = (
                f"recursive={str(recursive).lower()}&expand=false&cursor={start + self.page_size}"
            )
            base = f"{self.url}{urlsplit(handler.path).path}"
            headers["Link"] = f'<{base}?{params}>; rel="next"'
        self._json(handler, page, headers)

    @staticmethod
    def _entries(files: Mapping[str, HubFile], folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
                name = prefix + "/".join(parts[:i])
                entries.setdefault(name, {"type": "directory", "path": name, "oid": "0" * 40})
            if recursive or len(parts) == 1:
                hub_file = files[path]
                entry: dict[str, Any] = {
                    "type": "file",
                    "path": path,
                    "size": hub_file.size,
                    "oid": hub_file.oid,
                }
                if hub_file.lfs:
                    lfs = {"oid": hub_file.sha256, "size": hub_file.size}
                    entry["lfs"] = {**lfs, "pointerSize": hub_file.pointer_size}
                entries[path] = entry
        return list(entries.values())

    def _resolve(self, handler: _Handler, repo: FakeRepo, revision: str, path: str) -> None:
        sha = self._commit(handler, repo, revision)
        if sha is None:
            return
        commit = {"X-Repo-Commit": sha}
        hub_file = repo.index[sha].get(path)
        if hub_file is None:
            message = f"{path} does not exist at {sha}"
            self._error(handler, 404, "EntryNotFound", message, commit)
            return
        if hub_file.lfs:
            # LFS files live in content-addressed storage: the hub redirects to a CDN URL, and
            # the X-Linked-* headers describe the file behind it.
            etag = f'"{hub_file.sha256}"'
            headers = {
                **commit,
                "Location": f"{self.cdn_url}/cdn/{hub_file.sha256}",
                "ETag": etag,
                "X-Linked-Etag": etag,
                "X-Linked-Size": str(hub_file.size),
            }
            handler.reply(302, headers=headers)
            return
        handler.send_bytes(hub_file.size, hub_file.body, f'"{hub_file.oid}"', commit)

    def _cdn(self, handler: _Handler, sha256: str) -> None:
        for repo in list(self.repos.values()):
            hub_file = repo.blobs.get(sha256)
            if hub_file is not None:
                handler.send_bytes(hub_file.size, hub_file.body, f'"{sha256}"')
                return
        handler.reply(404)


@contextmanager
def fake_hub(*, page_size: int = 1000, port: int = 0, cdn_port: int = 0) -> Iterator[FakeHub]:
    hub = FakeHub(page_size, port=port, cdn_port=cdn_port)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def fake_hub_server() -> Iterator[FakeHub]:
    with fake_hub() as hub:
        yield hub


# ---------------------------------------------------------------------------------------------
# As a script: a server in its own process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run a loopback server in this process until interrupted or terminated."
    )
    servers = parser.add_subparsers(dest="server", required=True)
    hub = servers.add_parser(
        "fake-hub",
        help="The fake HF hub serving a directory's files as one commit of a repo.",
        description="Hash the files under --root once, commit them to --repo, print the hub's "
        "URL on stdout and serve (files are read from disk at each request).",
    )
    hub.add_argument("--root", type=Path, required=True, help="The directory to serve.")
    hub.add_argument("--repo", required=True, help="Repo id, e.g. acme/shards.")
    hub.add_argument("--branch", default="main", help="Branch of the commit (default main).")
    hub.add_argument("--token", help="Make the repo private: requests need this bearer token.")
    hub.add_argument("--page-size", type=int, default=1000, help="Tree entries per page.")
    hub.add_argument("--port", type=int, default=0, help="Hub port (default: any free one).")
    hub.add_argument("--cdn-port", type=int, default=0, help="CDN port (default: any free one).")
    args = parser.parse_args(argv)
    files = directory_files(args.root)
    if not files:
        parser.error(f"no files under {args.root}")
    with fake_hub(page_size=args.page_size, port=args.port, cdn_port=args.cdn_port) as server:
        repo = server.add_repo(args.repo, token=args.token)
        sha = repo.commit(files, branch=args.branch)
        print(server.url, flush=True)
        print(
            f"fake hub at {server.url} (CDN {server.cdn_url}): {args.repo}@{args.branch} is "
            f"{sha}, {len(files)} files from {args.root.resolve()}",
            file=sys.stderr,
            flush=True,
        )
        with suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
