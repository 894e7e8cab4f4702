"""Map pydantic errors onto the user's YAML: path, line, column, expectation, did-you-mean."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from bisllm_truss.issues import ConfigIssue, Path, RuleViolation
from bisllm_truss.schema import BisllmConfig
from bisllm_truss.yaml_positions import Position


class ErrorLocator:
    """Turns pydantic error locations into the user's YAML paths and file positions."""

    def __init__(self, data: dict[str, Any], positions: dict[Path, Position], filename: str):
        self.data = data
        self.positions = positions
        self.filename = filename

    def issue(self, path: Path, message: str, hint: str | None = None) -> ConfigIssue:
        position = self._position(path)
        return ConfigIssue(
            path,
            message,
            position.line if position else None,
            position.column if position else None,
            hint,
            self.filename,
        )

    def _position(self, path: Path) -> Position | None:
        for end in range(len(path), 0, -1):
            if path[:end] in self.positions:
                return self.positions[path[:end]]
        return None

    def user_path(self, loc: tuple[Any, ...]) -> Path:
        """Drop the parts of a pydantic location that are not keys in the file (union tags)."""
        path: list[str | int] = []
        node: Any = self.data
        for i, part in enumerate(loc):
            if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            ):
                node = node[part]
            elif i < len(loc) - 1:
                continue
            path.append(part)
        return tuple(path)

    def from_pydantic(self, exc: ValidationError) -> list[ConfigIssue]:
        issues = []
        for error in exc.errors():
            path = self.user_path(error["loc"])
            kind = error["type"]
            ctx = error.get("ctx") or {}
            cause = ctx.get("error")
            if isinstance(cause, RuleViolation):
                issues.extend(self.issue(path + sub, message) for sub, message in cause.violations)
            elif kind == "extra_forbidden":
                issues.append(self._unknown_key(error["loc"], path))
            elif kind == "missing":
                issues.append(self.issue(path, f"required key '{path[-1]}' is missing"))
            elif kind == "invalid_inference_stack":
                value = error.get("input", {}).get("inference_stack")
                issues.append(
                    self.issue(
                        (*path, "inference_stack"),
                        f"unknown inference_stack {value!r}; expected one of: v1, v2",
                        _did_you_mean(value, ["v1", "v2"]),
                    )
                )
            elif kind in ("enum", "literal_error"):
                expected = ctx.get("expected", "")
                choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",")]
                issues.append(
                    self.issue(
                        path,
                        f"{error['msg']}; got {error['input']!r}",
                        _did_you_mean(error["input"], choices),
                    )
                )
            elif kind in ("value_error", "assertion_error"):
                issues.append(self.issue(path, str(cause) if cause else error["msg"]))
            else:
                issues.append(self.issue(path, f"{error['msg']}; got {_short(error['input'])}"))
        return issues

    def _unknown_key(self, loc: tuple[Any, ...], path: Path) -> ConfigIssue:
        key = path[-1]
        allowed = sorted(_allowed_keys(loc[:-1]))
        hint = _did_you_mean(key, allowed)
        expected = (
            f"expected one of: {', '.join(allowed)}" if allowed else "no keys are allowed here"
        )
        return self.issue(path, f"unknown key '{key}'; {expected}", hint)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(value: Any, choices: list[str]) -> str | None:
    if not isinstance(value, str):
        return None
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return f"did you mean '{lowered[close[0]]}'?" if close else None


def _step(annotation: Any, part: Any) -> list[Any]:
    """The types reached from `annotation` by following one location part."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _step(args[0], part)
    if origin in (typing.Union, types.UnionType):
        return [t for arg in args for t in _step(arg, part)]
    if origin is list and isinstance(part, int):
        return [args[0]]
    if origin is dict and isinstance(part, str):
        return [args[1]]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, info in annotation.model_fields.items():
            aliases = getattr(info.validation_alias, "choices", [info.validation_alias, info.alias])
            if part == name or part in aliases:
                return [info.annotation]
    return []


def _models(annotation: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _allowed_keys(loc: tuple[Any, ...]) -> set[str]:
    candidates: list[Any] = [BisllmConfig]
    for part in loc:
        reached = [t for c in candidates for t in _step(c, part)]
        # A part that leads nowhere is a union tag pydantic inserted (e.g. 'v2'): keep the
        # union members that the tag selects.
        candidates = reached or [m for c in candidates for m in _models(c) if _tagged(m, part)]
    return {
        name for model in (m for c in candidates for m in _models(c)) for name in model.model_fields
    }


def _tagged(model: type[BaseModel], tag: Any) -> bool:
    """True when one of `model`'s Literal fields is exactly `tag` (how our unions discriminate)."""
    return any(
        typing.get_origin(info.annotation) is typing.Literal
        and typing.get_args(info.annotation) == (tag,)
        for info in model.model_fields.values()
    )
