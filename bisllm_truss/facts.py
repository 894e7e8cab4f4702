"""Read single validated values out of a config that may be invalid elsewhere.

Cross-block rules need a handful of leaves (the accelerator, the quantization type, the parallel
sizes, ...). Reading each leaf on its own lets a rule run even when an unrelated key in the same
block is wrong, so the user sees every error in one pass.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from bisllm_truss.schema import BisllmConfig
from bisllm_truss.schema.resources import AcceleratorSpec
from bisllm_truss.schema.trt_llm import TrtLlmV1, TrtLlmV2

_MISSING = object()

# Leaves whose model parses them with a field validator that a bare TypeAdapter would not run.
_PARSERS: dict[tuple[str, ...], Callable[[Any], Any]] = {
    ("resources", "accelerator"): lambda v: AcceleratorSpec.parse(v) if isinstance(v, str) else v,
}


class Unavailable(Exception):
    """The value is invalid (already reported by schema validation) so a rule cannot use it."""


class Facts:
    def __init__(self, data: dict[str, Any]):
        self.data = data

    def raw(self, *path: str | int) -> Any:
        node: Any = self.data
        for part in path:
            if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
            ):
                node = node[part]
            else:
                return _MISSING
        return node

    def stack(self) -> str:
        """ "v1" or "v2"; Unavailable when trt_llm is absent or names an unknown stack."""
        if not isinstance(self.raw("trt_llm"), dict):
            raise Unavailable(("trt_llm",))
        value = self.raw("trt_llm", "inference_stack")
        value = "v1" if value is _MISSING else value
        if value not in ("v1", "v2"):
            raise Unavailable(("trt_llm", "inference_stack"))
        return value

    def is_set(self, *path: str | int) -> bool:
        value = self.raw(*path)
        return value is not _MISSING and value is not None

    def count(self, *path: str | int) -> int:
        value = self.raw(*path)
        return len(value) if isinstance(value, list) else 0

    def get(self, *path: str | int) -> Any:
        """The validated value at `path`, its default when absent; Unavailable when invalid."""
        model: type[BaseModel] = BisllmConfig
        annotation: Any = None
        info = None
        for depth, part in enumerate(path):
            if isinstance(part, int):
                annotation = _list_item(annotation)
                model = _model_of(annotation, self.stack)
                continue
            if part not in model.model_fields:
                raise KeyError(f"{model.__name__} has no field {part}")
            info = model.model_fields[part]
            annotation = info.annotation
            if depth < len(path) - 1 and not isinstance(path[depth + 1], int):
                model = _model_of(annotation, self.stack)
        value = self.raw(*path)
        if value is _MISSING:
            parent = self.raw(*path[:-1])
            if parent is _MISSING or isinstance(parent, dict):
                assert info is not None
                return info.get_default(call_default_factory=True)
            raise Unavailable(path)
        parser = _PARSERS.get(tuple(p for p in path if isinstance(p, str)))
        try:
            if parser is not None:
                value = parser(value)
            assert info is not None
            annotation = (
                Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            )
            return TypeAdapter(annotation).validate_python(value)
        except (ValidationError, ValueError) as exc:
            raise Unavailable(path) from exc


def _list_item(annotation: Any) -> Any:
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    raise KeyError(f"{annotation} is not a list")


def _model_of(annotation: Any, stack: Callable[[], str]) -> type[BaseModel]:
    """The model class inside an Optional/Annotated/union annotation (trt_llm: by stack)."""
    if typing.get_origin(annotation) is Annotated:
        return _model_of(typing.get_args(annotation)[0], stack)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [m for m in typing.get_args(annotation) if m is not type(None)]
    models = [_model_of(m, stack) for m in members]
    if TrtLlmV1 in models and TrtLlmV2 in models:
        return TrtLlmV2 if stack() == "v2" else TrtLlmV1
    return models[0]
