"""The BDN manifest: which content hashes make up a mirrored weights source, and where they go.

A manifest is the only thing a node needs besides the origin store: it lists every file's
relative path, size and sha256, plus the store the blobs live in and the absolute mount location.
Paths are checked on construction so that a hostile or broken manifest cannot make the hydrator
write outside its target directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ManifestError(ValueError):
    """A manifest is unreadable, malformed, or names an unsafe path."""


def check_relative_path(path: str) -> str:
    """Return `path` if it is a safe relative POSIX path; raise ManifestError naming it otherwise.

    Refused: absolute paths, ``..``, empty or ``.`` segments (``a//b``, ``./a``, ``a/``),
    backslashes (a Windows separator that POSIX would treat as a file name character) and NUL.
    """
    if not path:
        raise ManifestError("empty file path")
    if "\x00" in path:
        raise ManifestError(f"file path {path!r} contains a NUL byte")
    if "\\" in path:
        raise ManifestError(f"file path {path!r} contains a backslash; use '/' separators")
    if path.startswith("/"):
        raise ManifestError(f"file path {path!r} is absolute; manifest paths are relative")
    for segment in path.split("/"):
        if segment in {"", ".", ".."}:
            raise ManifestError(
                f"file path {path!r} has an empty, '.' or '..' segment; paths must be normalised "
                "and stay inside the mount"
            )
    return path


class ManifestFile(BaseModel):
    """One file of a mirrored source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # The source's own etag (HF, S3), kept so a re-mirror can skip unchanged files.
    etag: str | None = None

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        return check_relative_path(value)


class Manifest(BaseModel):
    """The content-hash manifest written by the mirror and read by the hydrator."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    source: str
    revision: str | None
    config_hash: str
    store: str
    mount_location: str
    created_at: str
    files: list[ManifestFile]

    @field_validator("mount_location")
    @classmethod
    def _absolute_mount(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ManifestError(f"mount_location {value!r} must be an absolute path")
        return value

    @model_validator(mode="after")
    def _consistent_files(self) -> Manifest:
        seen: set[str] = set()
        sizes: dict[str, int] = {}
        for entry in self.files:
            if entry.path in seen:
                raise ManifestError(f"file path {entry.path!r} is listed more than once")
            seen.add(entry.path)
            # Identical content is stored once; two sizes for one hash means a broken manifest.
            if sizes.setdefault(entry.sha256, entry.size) != entry.size:
                raise ManifestError(
                    f"file path {entry.path!r}: sha256 {entry.sha256} appears with sizes "
                    f"{sizes[entry.sha256]} and {entry.size}"
                )
        # A path cannot be both a file and the directory holding another file.
        directories = {
            "/".join(parts[:i])
            for parts in (entry.path.split("/") for entry in self.files)
            for i in range(1, len(parts))
        }
        for entry in sorted(self.files, key=lambda e: e.path):
            if entry.path in directories:
                raise ManifestError(
                    f"file path {entry.path!r} is also the directory of another file"
                )
        return self

    @property
    def total_bytes(self) -> int:
        """Sum of all file sizes."""
        return sum(entry.size for entry in self.files)

    def canonical_json(self) -> str:
        """Deterministic JSON: sorted keys, files sorted by path, a trailing newline.

        Two manifests of the same content serialise to the same bytes, so the text can be hashed
        or diffed.
        """
        data = self.model_dump(mode="json")
        data["files"] = sorted(data["files"], key=lambda entry: entry["path"])
        return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    def dump(self, path: Path) -> None:
        """Write the manifest atomically: a temporary file in the same directory, then rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(self.canonical_json())
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a manifest is not secret
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read and validate a manifest; every problem becomes a ManifestError naming the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
        return cls.parse(text, origin=str(path))

    @classmethod
    def parse(cls, text: str, *, origin: str = "<manifest>") -> Manifest:
        """Validate manifest JSON text; `origin` prefixes error messages."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ManifestError(f"{origin}: invalid manifest: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """One line per problem, with its location (``files.3.path``) and message."""
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "manifest"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
