"""What every `bisllm` subcommand shares: failing with a message, loading a validated spec."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click

from bisllm_truss.spec import DeploymentSpec
from bisllm_truss.validate import ValidationResult, validate_file


def fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def report_invalid(result: ValidationResult) -> NoReturn:
    for issue in result.issues:
        click.echo(str(issue), err=True)
    noun = "error" if len(result.issues) == 1 else "errors"
    fail(f"{result.filename}: {len(result.issues)} {noun}")


def load_spec(config: Path) -> tuple[DeploymentSpec, str]:
    """CONFIG's normalized spec and source text; every validation error reported, exit 1."""
    result = validate_file(config)
    if not result.ok or result.spec is None:
        report_invalid(result)
    return result.spec, result.source_text
