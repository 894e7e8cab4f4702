"""One reported problem in a user's config, and the exception validators raise to report several."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """`("weights", 1, "mount_location")` → `weights[1].mount_location` (how users read YAML paths)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


@dataclass(frozen=True)
class ConfigIssue:
    """An error in the config, located in the user's file."""

    path: Path
    message: str
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    hint: str | None = None  # e.g. "did you mean 'max_batch_size'?"
    filename: str = "config.yaml"

    @property
    def dotted_path(self) -> str:
        return format_path(self.path)

    def __str__(self) -> str:
        where = self.filename
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        text = f"{where}: {self.dotted_path}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class RuleViolation(ValueError):
    """Raised by a model validator to report one or more errors at paths relative to that model.

    Pydantic keeps the raised exception in the error's context, so the validation layer can expand
    it back into separate, precisely located issues instead of one message on the whole block.
    """

    def __init__(self, violations: Sequence[tuple[Path, str]]):
        self.violations = list(violations)
        super().__init__("; ".join(message for _, message in self.violations))


def check_all(*checks: tuple[bool, Path, str]) -> None:
    """Raise one RuleViolation listing every failed check (condition True means a violation)."""
    failed = [(path, message) for bad, path, message in checks if bad]
    if failed:
        raise RuleViolation(failed)
