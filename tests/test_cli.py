"""`bisllm validate` and `bisllm migrate` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner
from conftest import base_config, with_value

from bisllm_truss.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write(tmp_path: Path, config: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_validate_ok(tmp_path: Path):
    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, base_config()))])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK:")


def test_validate_reports_every_error_and_exits_1(tmp_path: Path):
    config = with_value("trt_llm.runtime.max_batch_size", 0, with_value("resourcs", {}))
    result = CliRunner().invoke(main, ["validate", str(write(tmp_path, config))])
    assert result.exit_code == 1
    assert "resourcs: unknown key 'resourcs'" in result.stderr
    assert "(did you mean 'resources'?)" in result.stderr
    assert "trt_llm.runtime.max_batch_size" in result.stderr
    assert "2 errors" in result.stderr


def test_validate_missing_file_is_a_usage_error(tmp_path: Path):
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_console_script_runs(tmp_path: Path):
    config = write(tmp_path, base_config())
    bisllm = Path(sys.executable).parent / "bisllm"
    done = subprocess.run([str(bisllm), "validate", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    version = subprocess.run([str(bisllm), "--version"], capture_output=True, text=True)
    assert "bisllm, version" in version.stdout


def test_migrate_v1_example_end_to_end(tmp_path: Path):
    source = next(EXAMPLES.glob("v1-*.yaml"))
    original = source.read_text()
    out = tmp_path / "v2.yaml"
    runner = CliRunner()
    result = runner.invoke(main, ["migrate", str(source), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("---")  # a unified diff
    assert "+  inference_stack: v2" in result.stdout
    assert "warning:" in result.stderr
    assert source.read_text() == original  # -o leaves the input alone
    assert runner.invoke(main, ["validate", str(out)]).exit_code == 0
    # Comments of the user survive.
    kept = [line for line in original.splitlines() if line.strip().startswith("#")]
    migrated = out.read_text()
    assert sum(line in migrated for line in kept) >= len(kept) * 0.8
    # Migrating twice changes nothing.
    again = runner.invoke(main, ["migrate", str(out)])
    assert again.exit_code == 0
    assert "nothing to migrate" in again.stdout
    assert out.read_text() == migrated
    assert not out.with_name("v2.yaml.bak").exists()


def test_migrate_in_place_keeps_a_backup(tmp_path: Path):
    source = next(EXAMPLES.glob("v1-*.yaml"))
    target = tmp_path / "config.yaml"
    target.write_text(source.read_text())
    result = CliRunner().invoke(main, ["migrate", str(target)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "config.yaml.bak").read_text() == source.read_text()
    assert "inference_stack: v2" in target.read_text()


def test_migrate_dry_run_writes_nothing(tmp_path: Path):
    source = next(EXAMPLES.glob("v1-*.yaml"))
    target = tmp_path / "config.yaml"
    target.write_text(source.read_text())
    result = CliRunner().invoke(main, ["migrate", str(target), "--dry-run"])
    assert result.exit_code == 0
    assert target.read_text() == source.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_migrate_malformed_yaml(tmp_path: Path):
    target = tmp_path / "config.yaml"
    target.write_text("trt_llm: [\n")
    result = CliRunner().invoke(main, ["migrate", str(target)])
    assert result.exit_code == 1
    assert "error:" in result.stderr
