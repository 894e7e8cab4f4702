"""The distribution ships every package and template the code imports at run time."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for import_name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((import_name, *relative)) in listed, init


def test_no_generic_top_level_module_names():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(name.startswith("bisllm_") for name in config["package-dir"])


def test_templates_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["bisllm_templates"]
    templates = [p for p in (ROOT / "templates").rglob("*") if p.is_file() and p.suffix != ".py"]
    assert templates
    assert all(any(p.match(pattern.replace("**/", "")) for pattern in patterns) for p in templates)
