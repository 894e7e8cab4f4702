"""Load YAML into plain Python values while remembering where each key and item sits in the file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from bisllm_truss.issues import Path


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


class YamlSyntaxError(ValueError):
    """Malformed YAML, or a structure that YAML allows but a config must not have (duplicate keys)."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None):
        self.message = message
        self.line = line
        self.column = column
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(where + message)


def _position(mark: yaml.Mark) -> Position:
    return Position(mark.line + 1, mark.column + 1)


def _index(node: yaml.Node, path: Path, positions: dict[Path, Position]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, Position] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                first = seen[key]
                raise YamlSyntaxError(
                    f"duplicate key '{key}' (first defined at line {first.line})",
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
            seen[key] = _position(key_node.start_mark)
            positions[(*path, key)] = seen[key]
            _index(value_node, (*path, key), positions)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            positions[(*path, i)] = _position(item.start_mark)
            _index(item, (*path, i), positions)


def load_yaml_with_positions(text: str) -> tuple[Any, dict[Path, Position]]:
    """Parse `text`; return the data and a map from each key/item path to its position.

    Values come from PyYAML's safe loader, the same YAML dialect Truss reads config.yaml with, so a
    file means the same thing to us and to `truss push`.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or str(exc)
        if exc.context:
            problem = f"{exc.context}, {problem}"
        if mark is None:
            raise YamlSyntaxError(problem) from exc
        raise YamlSyntaxError(problem, mark.line + 1, mark.column + 1) from exc
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(str(exc)) from exc
    positions: dict[Path, Position] = {}
    if root is not None:
        _index(root, (), positions)
    return data, positions
