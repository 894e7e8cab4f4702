"""Validate a config.yaml: every error at once, each located by YAML path, line and column."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from bisllm_truss.issues import ConfigIssue
from bisllm_truss.locate import ErrorLocator
from bisllm_truss.rules import run_rules
from bisllm_truss.schema import BisllmConfig
from bisllm_truss.spec import DeploymentSpec, build_spec
from bisllm_truss.yaml_positions import YamlSyntaxError, load_yaml_with_positions


@dataclass
class ValidationResult:
    filename: str
    issues: list[ConfigIssue] = field(default_factory=list)
    config: BisllmConfig | None = None
    spec: DeploymentSpec | None = None
    source_text: str = ""

    @property
    def ok(self) -> bool:
        return not self.issues

    def report(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


def validate_file(path: str | Path) -> ValidationResult:
    path = Path(path)
    try:
        # Bytes, not read_text(): universal newlines would turn CRLF into LF and the copy we ship
        # (and its sha256) would no longer be the user's file.
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return ValidationResult(
            str(path), [ConfigIssue((), f"cannot read file: {exc}", filename=str(path))]
        )
    return validate_text(text, filename=str(path))


def validate_text(text: str, filename: str = "config.yaml") -> ValidationResult:
    try:
        data, positions = load_yaml_with_positions(text)
    except YamlSyntaxError as exc:
        issue = ConfigIssue(
            (), f"invalid YAML: {exc.message}", exc.line, exc.column, filename=filename
        )
        return ValidationResult(filename, [issue], source_text=text)
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        issue = ConfigIssue(
            (),
            f"expected a mapping of config keys at the top level, got {kind}",
            1,
            1,
            filename=filename,
        )
        return ValidationResult(filename, [issue], source_text=text)

    located = ErrorLocator(data, positions, filename)
    issues: list[ConfigIssue] = []
    config: BisllmConfig | None = None
    try:
        config = BisllmConfig.model_validate(data)
    except ValidationError as exc:
        issues.extend(located.from_pydantic(exc))
    issues.extend(located.issue(path, message) for path, message in run_rules(data))
    issues = sorted(
        set(issues), key=lambda i: (i.line or 0, i.column or 0, i.dotted_path, i.message)
    )
    result = ValidationResult(filename, issues, config if not issues else None, source_text=text)
    if result.ok and config is not None:
        result.spec = build_spec(config, source_text=text)
    return result
