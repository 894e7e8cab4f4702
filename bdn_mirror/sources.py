"""Read a weights source: pin its revision, list its files, stream each file's bytes.

`open_source` turns a `weights[]` entry (URI, auth, allow/ignore patterns) into a `Source`:

* `FileSource` -- a local directory (or one file). Symlinks are followed only while they stay
  inside the root; one that escapes it is refused, so a mirror never copies files the source
  does not own. (An HF cache snapshot folder, whose files link to ``../../blobs``, is refused
  for that reason: point file:// at a plain copy instead.)
* `S3Source` -- ``s3://``, plus ``gs://`` (GCS XML API with HMAC keys) and ``r2://`` through
  their S3-compatible endpoints; one ListObjectsV2 pass, then one GetObject per file.
* `HttpSource` -- one file over ``https://`` (HEAD for size and ETag, GET to stream), or a
  ``.tar.gz`` / ``.tgz`` archive whose regular-file members are the files. An archive is read
  in one streaming pass (tar has no index), so listing downloads it once and every `open()`
  of a member downloads it again up to that member.
* `HfSource` -- a Hugging Face repo. `pin()` resolves the revision (a branch such as ``main``)
  to its commit sha once; listing and reads then use that sha, so a push to the branch while
  mirroring cannot mix two commits.

Errors: every failure is a `SourceError` whose message starts with the source URI; refused
credentials (HTTP 401/403, InvalidAccessKeyId, missing or malformed secrets) are
`SourceAuthError`. A malformed URI raises `SourceURIError` (a ValueError) before any I/O.
No message or repr ever contains a secret value.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile

from bisllm_bdn.auth import (
    BearerToken,
    CredentialsError,
    S3Credentials,
    SecretStore,
    resolve_credentials,
)
from bisllm_bdn.patterns import PathFilter
from bisllm_bdn.uris import FileURI, HfURI, HttpURI, ObjectStoreURI, parse_source

S3_ENDPOINT_ENV = "BISLLM_S3_ENDPOINT"
HF_ENDPOINT_ENV = "HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
CHUNK_SIZE = 1 << 20
_HTTP_TIMEOUT = httpx.Timeout(60.0, connect=30.0)
# Error codes S3-compatible stores use when the keys are wrong, expired or not allowed.
_S3_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)


class SourceError(RuntimeError):
    """Reading a source failed; the message names the source URI (never a secret)."""


class SourceAuthError(SourceError):
    """The source refused the credentials, or they are missing or malformed."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source: `path` is posix and relative to the source root."""

    path: str
    size: int
    etag: str | None  # changes when the content changes; None when the source gives none


@dataclass
class Endpoints:
    """Where each kind of source is served. None fields fall back to the environment.

    Tests point these at loopback servers; deployments leave them alone (or set
    ``BISLLM_S3_ENDPOINT`` for an S3-compatible store, ``HF_ENDPOINT`` for a hub mirror).
    """

    s3: str | None = None  # None: $BISLLM_S3_ENDPOINT, else AWS's own endpoints
    gcs: str = "https://storage.googleapis.com"
    r2_template: str = "https://{account}.r2.cloudflarestorage.com"
    hf: str | None = None  # None: $HF_ENDPOINT, else https://huggingface.co

    def s3_url(self) -> str | None:
        return self.s3 or os.environ.get(S3_ENDPOINT_ENV) or None

    def hf_url(self) -> str:
        return (self.hf or os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT).rstrip("/")

    def r2_url(self, account: str) -> str:
        return self.r2_template.format(account=account)


class Source(ABC):
    """A weights source: `list_files()` then `open()` each file; see the module docstring."""

    uri: str

    def __init__(self, uri: str, path_filter: PathFilter):
        self.uri = uri
        self.path_filter = path_filter

    def pin(self) -> str | None:
        """An immutable id of the revision being read (HF commit sha); None where not applicable."""
        return None

    @abstractmethod
    def list_files(self) -> list[RemoteFile]:
        """Every file that passes the allow/ignore patterns, sorted by path."""

    @abstractmethod
    def open(self, path: str, *, offset: int = 0) -> BinaryIO:
        """Stream the bytes of the file at `path`, from byte `offset` on; the caller closes it."""

    def close(self) -> None:
        """Release connections; the source cannot be used afterwards."""
        return None  # most sources hold nothing between calls

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, {self.path_filter!r})"

    def _error(self, message: str, *, auth: bool = False) -> SourceError:
        return (SourceAuthError if auth else SourceError)(f"{self.uri}: {message}")

    def _select(self, files: Iterable[RemoteFile]) -> list[RemoteFile]:
        """The filtered, sorted listing; every selected path must be a safe relative path."""
        selected: dict[str, RemoteFile] = {}
        for file in files:
            if not self.path_filter.matches(file.path):
                continue  # an odd name the patterns leave out cannot harm the mirror
            self._check_path(file.path)
            if file.path in selected:
                raise self._error(f"the source lists '{file.path}' twice")
            selected[file.path] = file
        return [selected[p] for p in sorted(selected)]

    def _check_path(self, path: str) -> None:
        """Refuse paths that could escape a mount: absolute, '..', '.', empty segments, NUL."""
        segments = path.split("/")
        if "\0" in path or any(s in ("", ".", "..") for s in segments):
            raise self._error(f"'{path}' is not a safe relative file path")

    def _check_offset(self, offset: int) -> None:
        if offset < 0:
            raise self._error(f"offset must be >= 0, got {offset}")


def open_source(
    uri: str,
    *,
    auth: Mapping[str, Any] | None = None,
    secret_name: str | None = None,
    secrets: SecretStore | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    base_dir: Path | None = None,
    endpoints: Endpoints | None = None,
) -> Source:
    """The `Source` for one `weights[]` entry (or a deployment spec's WeightsMount).

    `secrets` defaults to ``$BISLLM_SECRETS_DIR`` or ``/secrets``; `base_dir` resolves relative
    ``file://`` paths. Credentials are read here, so a missing or malformed secret fails at
    once (`SourceAuthError`); nothing is contacted until `pin()` / `list_files()` / `open()`.
    """
    location = parse_source(uri, base_dir=base_dir)
    try:
        credentials = resolve_credentials(
            location, auth=auth, secret_name=secret_name, secrets=secrets
        )
    except CredentialsError as exc:
        # The message is ours and never holds the value; the chain would only repeat it.
        raise SourceAuthError(f"{uri}: {exc}") from None
    path_filter = PathFilter(allow_patterns, ignore_patterns)
    endpoints = endpoints or Endpoints()
    if isinstance(location, FileURI):
        return FileSource(location, path_filter)
    if isinstance(location, HttpURI):
        return HttpSource(location, cast(BearerToken | None, credentials), path_filter)
    if isinstance(location, HfURI):
        token = cast(BearerToken | None, credentials)
        return HfSource(location, token, endpoints.hf_url(), path_filter)
    if location.scheme == "gs":
        endpoint: str | None = endpoints.gcs
    elif location.scheme == "r2":
        endpoint = endpoints.r2_url(cast(str, location.account))
    else:
        endpoint = endpoints.s3_url()
    return S3Source(location, cast(S3Credentials, credentials), endpoint, path_filter)


class _ChunkReader(io.RawIOBase):
    """A readable stream over an iterator of byte chunks.

    Transport errors while reading become `SourceError`s built by `fail` (which names the
    source and file); `skip` discards that many leading bytes (a server that ignored Range).
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        close: Callable[[], None],
        fail: Callable[[BaseException, int], SourceError],
        skip: int = 0,
    ):
        super().__init__()
        self._chunks = chunks
        self._close = close
        self._fail = fail
        self._skip = skip
        self._buffer = memoryview(b"")
        self._position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buffer:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            except SourceError:
                raise
            except Exception as exc:
                # The transports (httpx, botocore, tarfile) each raise their own types; all of
                # them mean "this file could not be read", which callers handle as SourceError.
                raise self._fail(exc, self._position) from exc
            if self._skip:
                dropped = min(self._skip, len(chunk))
                self._skip -= dropped
                chunk = chunk[dropped:]
            self._buffer = memoryview(chunk)
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self._position += n
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                self._close()
            finally:
                super().close()


def _buffered(raw: _ChunkReader) -> BinaryIO:
    return cast(BinaryIO, io.BufferedReader(raw, buffer_size=CHUNK_SIZE))


class FileSource(Source):
    """A local directory (or a single file); etag is ``f"{size}-{mtime_ns}"``."""

    def __init__(self, location: FileURI, path_filter: PathFilter):
        super().__init__(location.uri, path_filter)
        self.path = location.path

    def _root(self) -> Path:
        if not self.path.exists():
            raise self._error(f"{self.path} does not exist")
        return self.path.resolve()

    def list_files(self) -> list[RemoteFile]:
        root = self._root()
        if root.is_file():
            return self._select([self._remote(self.path.name, root)])
        files: list[RemoteFile] = []
        self._walk(root, root, "", {root}, files)
        return self._select(files)

    def _walk(
        self, root: Path, directory: Path, prefix: str, active: set[Path], out: list[RemoteFile]
    ) -> None:
        # `active` holds the real folders on the current walk path: a symlink back into one of
        # them is a loop.
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = prefix + entry.name
                link = entry.is_symlink()
                if entry.is_dir():  # follows symlinks
                    real = self._inside(root, Path(entry.path), rel) if link else Path(entry.path)
                    if real in active:
                        raise self._error(f"symlink '{rel}' loops back to {real}")
                    self._walk(root, real, rel + "/", active | {real}, out)
                    continue
                if not self.path_filter.matches(rel):
                    continue  # checked first: an ignored odd file or link does no harm
                real = self._inside(root, Path(entry.path), rel) if link else Path(entry.path)
                if not real.is_file():
                    raise self._error(f"'{rel}' is not a regular file")
                out.append(self._remote(rel, real))

    def _inside(self, root: Path, link: Path, rel: str) -> Path:
        """Where `link` points, refusing targets outside `root` and broken links."""
        target = link.resolve()
        if not target.is_relative_to(root):
            raise self._error(
                f"symlink '{rel}' points outside the source root ({target}); refusing to follow it"
            )
        if not target.exists():
            raise self._error(f"symlink '{rel}' is broken (points to {target})")
        return target

    def _remote(self, rel: str, real: Path) -> RemoteFile:
        stat = real.stat()
        return RemoteFile(path=rel, size=stat.st_size, etag=f"{stat.st_size}-{stat.st_mtime_ns}")

    def open(self, path: str, *, offset: int = 0) -> BinaryIO:
        self._check_path(path)
        self._check_offset(offset)
        root = self._root()
        if root.is_file():
            if path != self.path.name:
                raise self._error(f"no file '{path}' (this source is the single file {root})")
            real = root
        else:
            real = (root / path).resolve()
            if not real.is_relative_to(root):
                raise self._error(
                    f"'{path}' leads outside the source root ({real}) through a symlink; "
                    "refusing to read it"
                )
        if not real.is_file():
            raise self._error(f"no file '{path}'")
        handle = real.open("rb")
        handle.seek(offset)
        return handle


class S3Source(Source):
    """An S3-compatible bucket prefix (AWS S3, GCS XML API, Cloudflare R2)."""

    def __init__(
        self,
        location: ObjectStoreURI,
        credentials: S3Credentials,
        endpoint: str | None,
        path_filter: PathFilter,
    ):
        super().__init__(location.uri, path_filter)
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.endpoint = endpoint
        self._secret_name = credentials.secret_name
        options: dict[str, Any] = {"retries": {"max_attempts": 5, "mode": "standard"}}
        if endpoint is not None:
            # Path-style works on every S3-compatible store and on loopback hosts.
            options["s3"] = {"addressing_style": "path"}
            if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
                # botocore >= 1.36 sends flexible checksums by default, which not every
                # S3-compatible store implements; older releases never send them.
                options["request_checksum_calculation"] = "when_required"
                options["response_checksum_validation"] = "when_required"
        config = Config(**options)
        # A private session with explicit keys: no ambient AWS credentials are ever used.
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=credentials.region,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token,
            config=config,
        )

    def list_files(self) -> list[RemoteFile]:
        files = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith("/"):
                        continue  # a "folder" marker object, not a file
                    etag = item.get("ETag", "").strip('"') or None
                    files.append(RemoteFile(key[len(self.prefix) :], item["Size"], etag))
        except (BotoCoreError, ClientError) as exc:
            raise self._s3_error(exc, "listing the bucket") from exc
        return self._select(files)

    def open(self, path: str, *, offset: int = 0) -> BinaryIO:
        self._check_path(path)
        self._check_offset(offset)
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + path}
        if offset:
            request["Range"] = f"bytes={offset}-"
        try:
            body = self._client.get_object(**request)["Body"]
        except (BotoCoreError, ClientError) as exc:
            raise self._s3_error(exc, f"reading '{path}'") from exc
        return _buffered(
            _ChunkReader(
                body.iter_chunks(CHUNK_SIZE),
                close=body.close,
                fail=lambda exc, done: self._error(
                    f"reading '{path}' failed after {offset + done} bytes: {exc}"
                ),
            )
        )

    def close(self) -> None:
        self._client.close()

    def _s3_error(self, exc: Exception, what: str) -> SourceError:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _S3_AUTH_CODES or status in (401, 403):
                return self._error(
                    f"{what} was refused ({code or status}): {exc}. Check the keys in secret "
                    f"'{self._secret_name}': they need s3:ListBucket on bucket '{self.bucket}' "
                    "and s3:GetObject on the prefix",
                    auth=True,
                )
            if code == "NoSuchBucket":
                return self._error(f"bucket '{self.bucket}' does not exist")
            if code in ("NoSuchKey", "404"):
                return self._error(f"{what}: no such object in bucket '{self.bucket}'")
        return self._error(f"{what} failed: {exc}")


class HttpSource(Source):
    """One file over http(s), or the members of a tar.gz archive (see the module docstring)."""

    def __init__(self, location: HttpURI, token: BearerToken | None, path_filter: PathFilter):
        super().__init__(location.uri, path_filter)
        self.url = location.url
        self.filename = location.filename
        self.archive = location.archive
        self._token = token

    def list_files(self) -> list[RemoteFile]:
        if self.archive:
            return self._select(self._archive_members())
        with _http_client(self._token) as client:
            response = _send(self, client, "HEAD", self.url, f"HEAD {self.url}", self._token)
            if response.status_code in (405, 501):
                # Some servers refuse HEAD; the headers of a GET we do not read serve as well.
                response = _send(
                    self, client, "GET", self.url, f"GET {self.url}", self._token, stream=True
                )
                response.close()
        length = response.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise self._error("the server did not report the file's size (Content-Length)")
        return self._select([RemoteFile(self.filename, int(length), _etag(response))])

    def open(self, path: str, *, offset: int = 0) -> BinaryIO:
        self._check_path(path)
        self._check_offset(offset)
        if self.archive:
            return self._open_member(path, offset)
        if path != self.filename:
            raise self._error(f"no file '{path}' (this source is the single file {self.filename})")
        return _http_stream(self, self.url, f"reading '{path}'", offset, self._token)[0]

    def _archive(self) -> tuple[tarfile.TarFile, BinaryIO, str | None]:
        """The archive opened for one forward pass, its byte stream, and its ETag."""
        stream, etag = _http_stream(self, self.url, f"reading {self.filename}", 0, self._token)
        try:
            # "r|*": one forward pass, compression detected from the bytes (gzip or none).
            return tarfile.open(fileobj=stream, mode="r|*"), stream, etag
        except tarfile.TarError as exc:
            stream.close()
            raise self._error(f"not a readable tar archive: {exc}") from exc

    def _members(self, tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
        """(path, member) for each regular file; links and devices are refused."""
        try:
            for member in tar:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if member.isdir() or not name:
                    continue
                if name.startswith("/") or ".." in name.split("/"):
                    raise self._error(f"archive member '{member.name}' escapes the archive root")
                if not member.isfile():
                    raise self._error(
                        f"archive member '{member.name}' is a link or special file; only "
                        "regular files are supported"
                    )
                yield name, member
        except tarfile.TarError as exc:
            raise self._error(f"the archive is corrupt: {exc}") from exc

    def _archive_members(self) -> list[RemoteFile]:
        tar, stream, etag = self._archive()
        with stream, tar:
            # A member changes whenever the archive does; without an archive ETag, say "unknown".
            return [
                RemoteFile(name, member.size, f"{etag}:{name}" if etag else None)
                for name, member in self._members(tar)
            ]

    def _open_member(self, path: str, offset: int) -> BinaryIO:
        tar, stream, _ = self._archive()

        def close() -> None:
            tar.close()
            stream.close()

        try:
            for name, member in self._members(tar):
                if name == path:
                    handle = cast(BinaryIO, tar.extractfile(member))
                    return _buffered(
                        _ChunkReader(
                            iter(partial(handle.read, CHUNK_SIZE), b""),
                            close=close,
                            fail=lambda exc, done: self._error(
                                f"reading member '{path}' failed after {offset + done} bytes: {exc}"
                            ),
                            skip=offset,
                        )
                    )
        except BaseException:
            close()
            raise
        close()
        raise self._error(f"no member '{path}' in the archive")


class HfSource(Source):
    """A Hugging Face model repo, read at one pinned commit."""

    def __init__(
        self, location: HfURI, token: BearerToken | None, endpoint: str, path_filter: PathFilter
    ):
        super().__init__(location.uri, path_filter)
        self.repo_id = location.repo_id
        self.revision = location.revision
        self.endpoint = endpoint
        self._token = token
        # token=False: never fall back to a token saved on this machine; a source reads with
        # the credentials it declares, or none.
        self._api = HfApi(endpoint=endpoint, token=token.token if token else False)
        self._sha: str | None = None
        # Readers on several threads must all see the one sha: resolve it exactly once.
        self._pin_lock = threading.Lock()

    def pin(self) -> str:
        """The commit sha of the revision, resolved on first use and fixed from then on."""
        with self._pin_lock:
            if self._sha is None:
                try:
                    info = self._api.model_info(self.repo_id, revision=self.revision)
                except Exception as exc:
                    raise self._hf_error(exc, f"resolving revision '{self.revision}'") from exc
                if not info.sha:
                    raise self._error(f"the hub returned no commit sha for '{self.revision}'")
                self._sha = info.sha
            return self._sha

    def list_files(self) -> list[RemoteFile]:
        sha = self.pin()
        files = []
        try:
            for item in self._api.list_repo_tree(self.repo_id, recursive=True, revision=sha):
                if isinstance(item, RepoFile):
                    # The hub's ETag for a file: its LFS sha256, else its git blob id.
                    etag = item.lfs.sha256 if item.lfs else item.blob_id
                    files.append(RemoteFile(item.path, item.size, etag))
        except Exception as exc:
            raise self._hf_error(exc, f"listing commit {sha}") from exc
        return self._select(files)

    def open(self, path: str, *, offset: int = 0) -> BinaryIO:
        self._check_path(path)
        self._check_offset(offset)
        url = hf_hub_url(self.repo_id, path, revision=self.pin(), endpoint=self.endpoint)
        # Large files redirect to a CDN; httpx drops Authorization when the origin changes.
        return _http_stream(self, url, f"reading '{path}'", offset, self._token)[0]

    def _hf_error(self, exc: Exception, what: str) -> SourceError:
        # huggingface_hub's transport raises its own types (httpx2 in 2.x, other clients in
        # older releases); whatever it raises means this source could not be read.
        if isinstance(exc, RevisionNotFoundError):
            return self._error(f"revision '{self.revision}' not found in {self.repo_id}")
        response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            return self._error(
                f"{what} was refused (HTTP {status}): {_auth_hint(self._token)}", auth=True
            )
        return self._error(f"{what} failed: {exc}")


def _http_client(token: BearerToken | None) -> httpx.Client:
    headers = {"Accept-Encoding": "identity"}  # the file's bytes, never a re-encoding of them
    if token is not None:
        # httpx drops Authorization on redirects to another origin (e.g. a CDN).
        headers["Authorization"] = f"Bearer {token.token}"
    return httpx.Client(headers=headers, follow_redirects=True, timeout=_HTTP_TIMEOUT)


def _send(
    source: Source,
    client: httpx.Client,
    method: str,
    url: str,
    what: str,
    token: BearerToken | None,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One request; transport failures and HTTP errors become SourceErrors naming `source`."""
    try:
        response = client.send(client.build_request(method, url, headers=headers), stream=stream)
    except httpx.HTTPError as exc:
        raise source._error(f"{what} failed: {exc}") from exc
    if response.status_code >= 400:
        response.close()
        raise _http_status_error(source, response, what, token)
    return response


def _http_stream(
    source: Source, url: str, what: str, offset: int, token: BearerToken | None
) -> tuple[BinaryIO, str | None]:
    """The body of a GET of `url` from byte `offset` on, and the response's ETag.

    Closing the stream closes the response and its client.
    """
    client = _http_client(token)
    headers = {"Range": f"bytes={offset}-"} if offset else None
    try:
        response = _send(source, client, "GET", url, what, token, stream=True, headers=headers)
    except BaseException:
        client.close()
        raise

    def close() -> None:
        response.close()
        client.close()

    reader = _ChunkReader(
        response.iter_bytes(CHUNK_SIZE),
        close=close,
        fail=lambda exc, done: source._error(f"{what} failed after {offset + done} bytes: {exc}"),
        # A server that ignores Range answers 200 with everything: drop the head here.
        skip=offset if offset and response.status_code != 206 else 0,
    )
    return _buffered(reader), _etag(response)


def _http_status_error(
    source: Source, response: httpx.Response, what: str, token: BearerToken | None
) -> SourceError:
    status = response.status_code
    if status in (401, 403):
        return source._error(f"{what} was refused (HTTP {status}): {_auth_hint(token)}", auth=True)
    if status == 404:
        return source._error(f"{what}: not found (HTTP 404 from {response.url})")
    if status == 416:
        return source._error(f"{what}: the requested range is past the end of the file")
    return source._error(f"{what} failed: HTTP {status} from {response.url}")


def _auth_hint(token: BearerToken | None) -> str:
    if token is None:
        return "the source may be private or gated; set auth_secret_name to a secret with a token"
    return f"check the token in secret '{token.secret_name}' and its access to this source"


def _etag(response: httpx.Response) -> str | None:
    value = response.headers.get("ETag")
    if not value:
        return None
    # Weak and strong validators name the same content for our purpose; keep the opaque part.
    return value.removeprefix("W/").strip('"') or None
