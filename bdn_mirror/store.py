"""The content-addressed origin store: blobs keyed by their sha256, on disk, in S3 or over HTTP.

Every backend uses one layout under its root, ``blobs/sha256/<first 2 hex>/<sha256>``, so a local
store directory can be uploaded to a bucket or served by any static HTTP server unchanged. Blobs
are immutable: a key names its content, so a second upload of the same key is skipped and two
racing uploads of one key are harmless (both write the same bytes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

# Bytes handed out per iteration of `read_range`: big enough to keep syscalls and Python overhead
# small, small enough that a progress bar moves and cancellation is prompt.
PIECE_BYTES = 1 << 20

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreError(RuntimeError):
    """A store could not serve a request. The message names the store URI, never credentials."""


class BlobMissingError(KeyError):
    """The store has no blob with this sha256."""

    def __init__(self, uri: str, sha256: str) -> None:
        super().__init__(sha256)
        self.uri = uri
        self.sha256 = sha256

    def __str__(self) -> str:
        return f"blob sha256:{self.sha256} is not in store {self.uri}"


def check_sha256(sha256: str) -> str:
    """Return `sha256` if it is 64 lowercase hex digits; raise ValueError otherwise.

    Keys end up in file paths and URLs, so anything else is refused before it gets there.
    """
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
    return sha256


def blob_key(sha256: str) -> str:
    """The blob's path relative to a store root: ``blobs/sha256/<2 hex>/<sha256>``."""
    check_sha256(sha256)
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def _check_range(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"bad byte range [{start}, {end})")


class BlobStore(ABC):
    """An origin store of immutable blobs addressed by sha256 (lowercase hex)."""

    uri: str

    @abstractmethod
    def has(self, sha256: str) -> bool:
        """Whether the blob exists."""

    @abstractmethod
    def size(self, sha256: str) -> int:
        """The blob's size in bytes; raises BlobMissingError when it does not exist."""

    @abstractmethod
    def put_file(self, sha256: str, path: Path) -> bool:
        """Upload the local file `path`, whose sha256 the caller computed.

        Returns False, sending no bytes, when the blob already exists. Safe when several
        processes put the same blob at once.
        """

    @abstractmethod
    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Stream bytes [start, end) of the blob in pieces; raises BlobMissingError or StoreError."""

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections; the store must not be used afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(BlobStore):
    """Blobs in a local directory (or a shared filesystem mounted on every node)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self.uri = self.root.as_uri()

    def path(self, sha256: str) -> Path:
        """Where the blob lives on disk (whether or not it exists)."""
        return self.root / blob_key(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobMissingError(self.uri, sha256) from None

    def put_file(self, sha256: str, path: Path) -> bool:
        final = self.path(sha256)
        if final.is_file():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        # Copy under a temporary name in the same directory, then link it into place: os.link
        # never overwrites, so the first finished writer wins and a reader can never see a
        # half-written blob under the final name.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{sha256[:12]}.", suffix=".tmp", dir=final.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, PIECE_BYTES * 8)
                out.flush()
                os.fsync(out.fileno())
            # Immutable content: a blob that can be written to invites silent corruption.
            tmp.chmod(0o444)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False  # another writer finished first; its bytes are the same
            except OSError:
                # Filesystems without hard links: replace is still atomic, only not exclusive.
                os.replace(tmp, final)
            return True
        except OSError as exc:
            raise StoreError(f"cannot store blob sha256:{sha256} in {self.uri}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        _check_range(start, end)
        try:
            f = open(self.path(sha256), "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise BlobMissingError(self.uri, sha256) from None
        except OSError as exc:
            raise StoreError(f"cannot read sha256:{sha256} in {self.uri}: {exc}") from exc
        with f:
            pos = start
            while pos < end:
                try:
                    piece = os.pread(f.fileno(), min(PIECE_BYTES, end - pos), pos)
                except OSError as exc:
                    raise StoreError(f"cannot read sha256:{sha256} in {self.uri}: {exc}") from exc
                if not piece:
                    raise StoreError(
                        f"blob sha256:{sha256} in {self.uri} ends at byte {pos}, before {end}"
                    )
                pos += len(piece)
                yield piece


class S3Store(BlobStore):
    """Blobs in an S3 (or S3-compatible) bucket under a key prefix."""

    # Uploads above this use multipart (parallel parts); below it, one PUT.
    MULTIPART_BYTES = 64 << 20

    def __init__(
        self,
        uri: str,
        *,
        credentials: dict[str, Any] | None = None,
        endpoint_url: str | None = None,
        max_connections: int = 32,
    ) -> None:
        import boto3
        from botocore.config import Config

        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket[/prefix] URI: {uri!r}")
        self.uri = uri.rstrip("/")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        creds = credentials or {}
        # Key names follow the BDN S3 secret format; a region is required by botocore even for
        # custom endpoints, so it defaults the way BDN documents.
        session = boto3.session.Session(
            aws_access_key_id=creds.get("aws_access_key_id"),
            aws_secret_access_key=creds.get("aws_secret_access_key"),
            aws_session_token=creds.get("aws_session_token"),
            region_name=creds.get("aws_region") or "us-east-1",
        )
        # One client shared by all threads (botocore clients are thread-safe); the pool must be
        # at least as large as the number of concurrent ranged reads or they queue.
        self._client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                max_pool_connections=max_connections,
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )

    def close(self) -> None:
        self._client.close()

    def key(self, sha256: str) -> str:
        """The object key of a blob."""
        return f"{self.prefix}/{blob_key(sha256)}" if self.prefix else blob_key(sha256)

    def _error(self, action: str, sha256: str, exc: Exception) -> StoreError:
        # botocore messages carry the operation and error code, not the signing secret.
        return StoreError(f"{action} sha256:{sha256} in {self.uri} failed: {exc}")

    def _head(self, sha256: str) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if _s3_not_found(exc):
                return None
            raise self._error("HEAD", sha256, exc) from exc
        except BotoCoreError as exc:
            raise self._error("HEAD", sha256, exc) from exc

    def has(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def size(self, sha256: str) -> int:
        head = self._head(sha256)
        if head is None:
            raise BlobMissingError(self.uri, sha256)
        return int(head["ContentLength"])

    def put_file(self, sha256: str, path: Path) -> bool:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import S3UploadFailedError

        if self.has(sha256):
            return False
        # A single PUT or a completed multipart upload becomes visible all at once, so readers
        # never see a partial object; a racing duplicate upload writes identical bytes.
        config = TransferConfig(
            multipart_threshold=self.MULTIPART_BYTES,
            multipart_chunksize=self.MULTIPART_BYTES,
            max_concurrency=8,
        )
        try:
            self._client.upload_file(str(path), self.bucket, self.key(sha256), Config=config)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise self._error("upload of", sha256, exc) from exc
        return True

    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_range(start, end)
        if start == end:
            return  # an empty HTTP range is not expressible
        received = 0
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self.key(sha256), Range=f"bytes={start}-{end - 1}"
            )
            # Closing the body returns the connection to the pool even if the reader stops early.
            with contextlib.closing(response["Body"]) as body:
                for piece in body.iter_chunks(PIECE_BYTES):
                    received += len(piece)
                    yield piece
        except ClientError as exc:
            if _s3_not_found(exc):
                raise BlobMissingError(self.uri, sha256) from None
            raise self._error("GET", sha256, exc) from exc
        except BotoCoreError as exc:
            raise self._error("GET", sha256, exc) from exc
        if received != end - start:
            raise StoreError(
                f"GET sha256:{sha256} in {self.uri} returned {received} bytes for range "
                f"[{start}, {end})"
            )


def _s3_not_found(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


class HttpStore(BlobStore):
    """A read-only store served over HTTP(S), e.g. a CDN or a static file server."""

    def __init__(
        self,
        uri: str,
        *,
        credentials: dict[str, Any] | None = None,
        max_connections: int = 32,
        timeout_s: float = 60.0,
    ) -> None:
        import httpx

        self.uri = uri.rstrip("/")
        headers = {}
        token = (credentials or {}).get("token")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # httpx.Client is safe to share across threads; its pool bounds concurrent connections.
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=True,
        )

    def close(self) -> None:
        self._client.close()

    def url(self, sha256: str) -> str:
        """The blob's URL."""
        return f"{self.uri}/{quote(blob_key(sha256))}"

    def _head(self, sha256: str) -> int | None:
        import httpx

        try:
            response = self._client.head(self.url(sha256))
        except httpx.HTTPError as exc:
            raise StoreError(f"HEAD sha256:{sha256} in {self.uri} failed: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise StoreError(
                f"HEAD sha256:{sha256} in {self.uri} returned HTTP {response.status_code}"
            )
        return int(response.headers.get("content-length", "0"))

    def has(self, sha256: str) -> bool:
        return self._head(sha256) is not None

    def size(self, sha256: str) -> int:
        size = self._head(sha256)
        if size is None:
            raise BlobMissingError(self.uri, sha256)
        return size

    def put_file(self, sha256: str, path: Path) -> bool:
        raise StoreError(f"store {self.uri} is read-only (HTTP); cannot put sha256:{sha256}")

    def read_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        import httpx

        _check_range(start, end)
        if start == end:
            return
        want = end - start
        received = 0
        try:
            # Identity encoding: a compressed answer would make the byte range meaningless.
            headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
            with self._client.stream("GET", self.url(sha256), headers=headers) as response:
                if response.status_code == 404:
                    raise BlobMissingError(self.uri, sha256)
                # A server that ignores Range answers 200 with the whole blob: skip to `start`.
                if response.status_code == 200:
                    skip = start
                elif response.status_code == 206:
                    skip = 0
                else:
                    raise StoreError(
                        f"GET sha256:{sha256} in {self.uri} returned HTTP {response.status_code}"
                    )
                for data in response.iter_raw(PIECE_BYTES):
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    data = data[: want - received]
                    if data:
                        received += len(data)
                        yield data
                    if received == want:
                        break
        except httpx.HTTPError as exc:
            raise StoreError(f"GET sha256:{sha256} in {self.uri} failed: {exc}") from exc
        if received != want:
            raise StoreError(
                f"GET sha256:{sha256} in {self.uri} returned {received} bytes for range "
                f"[{start}, {end})"
            )


def open_store(
    uri: str, *, credentials: dict[str, Any] | None = None, endpoint_url: str | None = None
) -> BlobStore:
    """Open the store a URI names: ``file:///dir`` or a path, ``s3://bucket/prefix``, ``http(s)://``.

    `credentials` uses the BDN secret key names for S3 (``aws_access_key_id``,
    ``aws_secret_access_key``, ``aws_session_token``, ``aws_region``) and ``token`` (a bearer token)
    for HTTP. `endpoint_url` points S3 at a compatible service (R2, MinIO, moto).
    """
    scheme = urlsplit(uri).scheme
    if scheme == "s3":
        return S3Store(uri, credentials=credentials, endpoint_url=endpoint_url)
    if scheme in {"http", "https"}:
        return HttpStore(uri, credentials=credentials)
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in {"", "localhost"}:
            raise ValueError(f"file URI must name a local absolute path: {uri!r}")
        return LocalStore(Path(unquote(parts.path)))
    if scheme == "":
        return LocalStore(Path(uri))
    raise ValueError(f"unsupported store URI {uri!r}: use file://, s3://, http:// or https://")
