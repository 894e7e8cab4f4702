"""Shared helpers: build config.yaml texts and validate them."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from bisllm_truss.validate import ValidationResult, validate_text

# A small valid v2 config; tests copy it and change one thing.
BASE_CONFIG: dict[str, Any] = {
    "model_name": "qwen3-moe",
    "resources": {"accelerator": "H100:2", "use_gpu": True},
    "trt_llm": {
        "inference_stack": "v2",
        "build": {"checkpoint_repository": {"source": "HF", "repo": "Qwen/Qwen3-30B-A3B"}},
        "runtime": {"tensor_parallel_size": 2},
    },
}


def base_config() -> dict[str, Any]:
    return copy.deepcopy(BASE_CONFIG)


def with_value(path: str, value: Any, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `config` (default BASE_CONFIG) with the dotted `path` set to `value`."""
    config = copy.deepcopy(config) if config is not None else base_config()
    node = config
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return config


def check(config: dict[str, Any] | str) -> ValidationResult:
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
    return validate_text(text, filename="config.yaml")


def messages(result: ValidationResult) -> list[str]:
    return [f"{issue.dotted_path}: {issue.message}" for issue in result.issues]


@pytest.fixture
def valid_spec():
    result = check(base_config())
    assert result.ok, result.report()
    return result.spec
