"""Parse a `weights[].source` URI into a typed location.

Accepted forms (the BDN ones from the product spec, plus the two this project adds):

* ``hf://owner/repo[@revision]`` -- a Hugging Face model repo; the revision (branch, tag or
  commit sha, default ``main``) may itself contain ``/`` (``@refs/pr/1``). There is no subpath:
  select files with ``allow_patterns`` instead.
* ``s3://bucket[/prefix]``, ``gs://bucket[/prefix]``, ``r2://account_id.bucket[/prefix]`` --
  object stores; the prefix names a folder, so ``s3://b/models/llama`` never picks up
  ``models/llama-2/...``.
* ``https://host/path`` -- one file, or a ``.tar.gz`` / ``.tgz`` archive whose members are the
  files. ``http://`` is accepted too (local servers and tests); config.yaml only lets
  ``https://`` through, so deployed configs never fetch in clear text.
* ``file:///abs/path`` (also ``file://localhost/abs/path``) and ``file://rel/path``, which is
  resolved against a base directory the caller passes (usually the folder of config.yaml).

Schemes that config.yaml accepts but this runtime cannot read yet (``azure://``, ``cw://``,
``bt://``) are refused with an error that says so, instead of a generic "unknown scheme".
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

DEFAULT_HF_REVISION = "main"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")

# Valid in config.yaml (bisllm_truss.schema.weights) but without a reader in this package.
_NOT_YET_READABLE = ("azure", "cw", "bt")
_FORMS = (
    "hf://owner/repo[@revision], s3://bucket/prefix, gs://bucket/prefix, "
    "r2://account_id.bucket/prefix, https://host/path, file:///abs/path"
)
# Hub ids: letters, digits, '-', '_', '.' (huggingface_hub validates the same character set).
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SourceURIError(ValueError):
    """A source URI that cannot be read: the message names the URI and the expected form."""


@dataclass(frozen=True)
class HfURI:
    """``hf://owner/repo@revision``."""

    uri: str
    repo_id: str
    revision: str
    scheme: str = "hf"


@dataclass(frozen=True)
class ObjectStoreURI:
    """``s3://``, ``gs://`` or ``r2://``: a bucket and a folder prefix ('' or ending in '/')."""

    uri: str
    scheme: str
    bucket: str
    prefix: str
    account: str | None = None  # r2 only: the Cloudflare account id that names the endpoint


@dataclass(frozen=True)
class HttpURI:
    """``https://`` (or ``http://``): one file, or a tar.gz archive when `archive` is set."""

    uri: str
    scheme: str
    url: str
    filename: str  # the last path segment, unquoted: the file's name in the source
    archive: bool


@dataclass(frozen=True)
class FileURI:
    """``file://``: a local directory (or single file), already made absolute."""

    uri: str
    path: Path
    scheme: str = "file"


SourceURI = HfURI | ObjectStoreURI | HttpURI | FileURI


def parse_source(uri: str, *, base_dir: Path | None = None) -> SourceURI:
    """Parse `uri`; `base_dir` resolves relative ``file://`` paths (there is no implicit cwd)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise SourceURIError(f"source '{uri}' has no scheme; expected one of {_FORMS}")
    if scheme == "hf":
        return _parse_hf(uri, rest)
    if scheme in ("s3", "gs", "r2"):
        return _parse_object_store(uri, scheme, rest)
    if scheme in ("https", "http"):
        return _parse_http(uri)
    if scheme == "file":
        return _parse_file(uri, rest, base_dir)
    if scheme in _NOT_YET_READABLE:
        raise SourceURIError(
            f"source '{uri}': {scheme}:// sources are not supported by the bisllm mirror yet; "
            f"supported forms: {_FORMS}"
        )
    raise SourceURIError(f"source '{uri}' has unsupported scheme '{scheme}://'; expected {_FORMS}")


def _parse_hf(uri: str, rest: str) -> HfURI:
    expected = f"expected hf://owner/repo[@revision], got '{uri}'"
    repo_id, at, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_HF_NAME.match(p) for p in parts):
        hint = " (there is no subpath: select files with allow_patterns)" if len(parts) > 2 else ""
        raise SourceURIError(f"{expected}{hint}")
    if at and not revision:
        raise SourceURIError(f"{expected}: the revision after '@' is empty")
    if any(c.isspace() for c in revision):
        raise SourceURIError(f"{expected}: the revision contains whitespace")
    return HfURI(uri=uri, repo_id=repo_id, revision=revision or DEFAULT_HF_REVISION)


def _parse_object_store(uri: str, scheme: str, rest: str) -> ObjectStoreURI:
    form = "r2://account_id.bucket/prefix" if scheme == "r2" else f"{scheme}://bucket/prefix"
    netloc, _, path = rest.partition("/")
    account = None
    bucket = netloc
    if scheme == "r2":
        # R2 bucket names have no dots, so the first dot splits account id from bucket.
        account, _, bucket = netloc.partition(".")
        if not account or not bucket:
            raise SourceURIError(f"expected {form}, got '{uri}': the account id or bucket is empty")
    if not bucket:
        raise SourceURIError(f"expected {form}, got '{uri}': the bucket is empty")
    segments = [s for s in path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise SourceURIError(f"expected {form}, got '{uri}': '.' and '..' are not allowed")
    prefix = "".join(f"{s}/" for s in segments)
    return ObjectStoreURI(uri=uri, scheme=scheme, bucket=bucket, prefix=prefix, account=account)


def _parse_http(uri: str) -> HttpURI:
    parts = urlsplit(uri)
    if not parts.hostname:
        raise SourceURIError(f"expected https://host/path, got '{uri}': the host is empty")
    filename = unquote(posixpath.basename(parts.path))
    if not filename or filename in (".", ".."):
        raise SourceURIError(
            f"expected https://host/path/to/file, got '{uri}': the URL must name a file "
            "(a single file or a .tar.gz/.tgz archive), not a folder"
        )
    archive = parts.path.lower().endswith(ARCHIVE_SUFFIXES)
    # Fragments never reach the server; drop them so the URL we request is the one we list.
    url = parts._replace(fragment="").geturl()
    return HttpURI(uri=uri, scheme=parts.scheme, url=url, filename=filename, archive=archive)


def _parse_file(uri: str, rest: str, base_dir: Path | None) -> FileURI:
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]  # RFC 8089: file://localhost/x is the local file /x
    if not rest or rest == "/":
        raise SourceURIError(f"expected file:///abs/path, got '{uri}': the path is empty")
    local = Path(unquote(rest))
    if not local.is_absolute():
        if base_dir is None:
            raise SourceURIError(
                f"source '{uri}' is a relative file:// path; give a base directory to resolve "
                "it against, or use file:///absolute/path"
            )
        local = Path(base_dir) / local
    return FileURI(uri=uri, path=Path(posixpath.normpath(local.as_posix())))
