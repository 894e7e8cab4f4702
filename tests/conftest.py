"""Shared helpers: build config.yaml texts and validate them; tiny engine checkpoints."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
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


# -- engine fixtures (torch is imported lazily so the packaging tests stay light) ----------


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The test models are tiny: a second intra-op thread only adds sync overhead, and on a
    busy 2-core machine its spin-waits make the engine tests several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Tiny random HF checkpoint of a variant in engine_checkpoints.VARIANTS, built once."""
    from engine_checkpoints import build_variant

    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_variant(variant, tmp_path_factory.mktemp(variant))
        return built[variant]

    return get


@pytest.fixture(scope="session")
def hf_model(checkpoint: Callable[[str], Path]) -> Callable[[str], Any]:
    """The transformers reference model (fp32, eager) of a variant, loaded once."""
    from engine_checkpoints import reference_model

    models: dict[str, Any] = {}

    def get(variant: str) -> Any:
        if variant not in models:
            models[variant] = reference_model(checkpoint(variant))
        return models[variant]

    return get
