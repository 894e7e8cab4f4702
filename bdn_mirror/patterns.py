"""`allow_patterns` / `ignore_patterns`: which files of a source are mirrored.

Patterns are Unix globs matched against a file's path relative to the source root, one ``/``
separated segment at a time, as the BDN docs describe (``*.x`` matches only the top level; use
``**/*.x`` for subdirectories):

* ``*`` matches any run of characters inside one segment and never crosses ``/``;
  ``?`` matches one character; ``[abc]`` / ``[!abc]`` are character classes (case-sensitive).
* a segment that is exactly ``**`` matches zero or more whole segments; at the end of a
  pattern it matches one or more, so ``dir/**`` is everything inside ``dir`` (as in gitignore).
* a pattern ending in ``/`` names a folder and means everything below it (``dir/`` is
  ``dir/**``).
* a leading ``/`` or ``./`` is ignored: patterns are always relative to the source root.

Examples::

    *.safetensors           model.safetensors        (not sub/model.safetensors)
    **/*.safetensors        model.safetensors, a/b/model.safetensors
    original/**             original/x.pth, original/a/b.json   (not original itself)
    tokenizer*              tokenizer.json, tokenizer_config.json
    shard-0000[0-4].bin     shard-00000.bin ... shard-00004.bin

A file is kept when it matches at least one allow pattern (no allow list means every file) and
no ignore pattern: ignore wins. An empty allow list keeps nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from functools import lru_cache


class PathFilter:
    """The allow/ignore rule of one weights source."""

    def __init__(self, allow: Sequence[str] | None = None, ignore: Sequence[str] | None = None):
        self.allow = None if allow is None else tuple(allow)
        self.ignore = tuple(ignore or ())
        self._allow = None if allow is None else [_split(p) for p in allow]
        self._ignore = [_split(p) for p in self.ignore]

    def matches(self, path: str) -> bool:
        """Whether the file at `path` (posix, relative to the source root) is mirrored."""
        segments = tuple(path.split("/"))
        if self._allow is not None and not any(_match(p, segments) for p in self._allow):
            return False
        return not any(_match(p, segments) for p in self._ignore)

    def __repr__(self) -> str:
        return f"PathFilter(allow={self.allow!r}, ignore={self.ignore!r})"


def _split(pattern: str) -> tuple[str, ...]:
    """A pattern as a tuple of segments, normalized as the module docstring describes."""
    while pattern.startswith(("./", "/")):
        pattern = pattern[2:] if pattern.startswith("./") else pattern[1:]
    if pattern.endswith("/"):
        pattern += "**"
    # Empty segments ('a//b') would never match a real path; dropping them is what users mean.
    return tuple(s for s in pattern.split("/") if s)


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    return _match_from(pattern, segments, 0, 0)


@lru_cache(maxsize=65536)
def _match_from(pattern: tuple[str, ...], segments: tuple[str, ...], i: int, j: int) -> bool:
    # Memoized on (i, j), so patterns with several '**' stay polynomial, not exponential.
    if i == len(pattern):
        return j == len(segments)
    if pattern[i] == "**":
        if i == len(pattern) - 1:
            return j < len(segments)  # a trailing '**' is "anything inside": at least one segment
        # Either '**' matches nothing more, or it swallows one more segment.
        return _match_from(pattern, segments, i + 1, j) or (
            j < len(segments) and _match_from(pattern, segments, i, j + 1)
        )
    return (
        j < len(segments)
        and fnmatchcase(segments[j], pattern[i])
        and _match_from(pattern, segments, i + 1, j + 1)
    )
