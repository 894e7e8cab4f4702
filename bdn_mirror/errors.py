"""Errors of hydration, shared by the hydrator and the mount writer."""

from __future__ import annotations


class HydrateError(RuntimeError):
    """Hydration failed; the target holds no file from this call."""


class BlobCorruptError(HydrateError):
    """A blob fetched from the origin does not hash to its manifest sha256."""

    def __init__(self, path: str, expected: str, actual: str, store: str) -> None:
        super().__init__(
            f"{path}: content from {store} is corrupt: expected sha256 {expected}, got {actual}; "
            "the download was discarded"
        )
        self.path = path
        self.expected = expected
        self.actual = actual
        self.store = store


class UnsafePathError(HydrateError):
    """Writing a manifest file would go through a symlink that leaves the target directory."""
