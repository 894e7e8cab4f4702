"""The `bisllm` command line: validate, migrate, package and push BIS-LLM configs."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from bisllm_truss import __version__
from bisllm_truss.cli_bdn import hydrate, mirror
from bisllm_truss.cli_bench import bench
from bisllm_truss.cli_common import fail, load_spec, report_invalid
from bisllm_truss.cli_generate import generate
from bisllm_truss.cli_serve import serve
from bisllm_truss.migrate import MigrationError, migrate_text
from bisllm_truss.package import OutputDirError, PackageOptions, render_package, write_tree
from bisllm_truss.package.render import TARGETS, PackageError
from bisllm_truss.push import PushError, push
from bisllm_truss.validate import validate_file, validate_text

config_argument = click.argument(
    "config", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bisllm")
def main() -> None:
    """Validate, migrate and package BIS-LLM-compatible configs for self-hosting or truss push."""


@main.command()
@config_argument
def validate(config: Path) -> None:
    """Check CONFIG; print every error with its line and column, or OK."""
    result = validate_file(config)
    if not result.ok:
        report_invalid(result)
    spec = result.spec
    assert spec is not None
    gpus = (
        f"{spec.hardware.accelerator}:{spec.hardware.gpus_per_node}"
        if spec.hardware.accelerator
        else "CPU"
    )
    click.echo(
        f"OK: {config} — {spec.model_name} on {gpus}, tensor_parallel_size {spec.parallel.tensor_parallel_size}"
    )


@main.command()
@config_argument
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the v2 config here (default: rewrite CONFIG, keeping CONFIG.bak).",
)
@click.option("--dry-run", is_flag=True, help="Only print the diff.")
@click.option(
    "--tokens-per-request",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="Average input+output tokens per request, to turn concurrency_target into target_in_flight_tokens.",
)
def migrate(config: Path, output: Path | None, dry_run: bool, tokens_per_request: int) -> None:
    """Migrate a v1 (Engine-Builder-LLM) CONFIG to the v2 inference stack (BIS-LLM)."""
    original = config.read_text(encoding="utf-8")
    try:
        migration = migrate_text(original, tokens_per_request=tokens_per_request)
    except MigrationError as exc:
        fail(f"{config}: {exc}")
    if not migration.changed:
        click.echo(f"{config} already uses inference_stack v2; nothing to migrate.")
        return
    click.echo(migration.diff(f"a/{config.name}", f"b/{(output or config).name}"), nl=False)
    for warning in migration.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    result = validate_text(migration.migrated, filename=str(output or config))
    if not result.ok:
        click.secho("The migrated config still needs manual changes:", fg="yellow", err=True)
        for issue in result.issues:
            click.echo(f"  {issue}", err=True)
    if dry_run:
        return
    if output is None:
        backup = config.with_name(config.name + ".bak")
        backup.write_text(original, encoding="utf-8")
        click.echo(f"Saved the original as {backup}", err=True)
        output = config
    output.write_text(migration.migrated, encoding="utf-8")
    click.echo(f"Wrote {output}", err=True)
    if not result.ok:
        sys.exit(1)


def _targets(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        fail(f"expected a comma-separated subset of {', '.join(TARGETS)}, got {value!r}")
    return targets


force_option = click.option(
    "--force",
    is_flag=True,
    help="Replace an output directory written by an earlier `bisllm package`.",
)
image_options = [
    click.option(
        "--image-repository",
        default=PackageOptions.image_repository,
        show_default=True,
        help="Registry path of the runtime image (tag: version_overrides.v2_llm_version or the plugin version).",
    ),
    click.option(
        "--prometheus-address",
        default=PackageOptions.prometheus_address,
        show_default=True,
        help="Prometheus that KEDA queries for in-flight tokens.",
    ),
]


def _with_image_options(function):  # type: ignore[no-untyped-def]
    for option in reversed(image_options):
        function = option(function)
    return function


def _manifest_files(directory: Path | None) -> tuple[tuple[str, str], ...]:
    """`bisllm mirror`'s manifests in `directory`, checked, named manifest.<stem>.json."""
    if directory is None:
        return ()
    from bisllm_bdn.manifest import Manifest, ManifestError

    files = []
    for path in sorted(directory.glob("*.json")):
        try:
            Manifest.load(path)
        except ManifestError as exc:
            fail(f"{path}: {exc}")
        files.append((f"manifest.{path.stem}.json", path.read_text()))
    if not files:
        fail(f"--manifests {directory}: no manifest (*.json) in it; run bisllm mirror first")
    return tuple(files)


def _package(
    config: Path,
    output: Path,
    force: bool,
    targets: str,
    image_repository: str,
    prometheus_address: str,
    manifests: Path | None = None,
) -> Path:
    spec, source_text = load_spec(config)
    options = PackageOptions(
        targets=_targets(targets),
        image_repository=image_repository,
        prometheus_address=prometheus_address,
        manifests=_manifest_files(manifests),
    )
    try:
        files = render_package(spec, source_text, options)
        return write_tree(files, output, force=force, protected=[config])
    except (PackageError, OutputDirError) as exc:
        fail(str(exc))


@main.command()
@config_argument
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@force_option
@click.option(
    "--target",
    "targets",
    default=",".join(TARGETS),
    show_default=True,
    help="Comma-separated outputs to render.",
)
@click.option(
    "--manifests",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Weights manifests from `bisllm mirror`: the Kubernetes ConfigMap carries them and "
    "workers hydrate them before loading.",
)
@_with_image_options
def package(
    config: Path,
    output: Path,
    force: bool,
    targets: str,
    manifests: Path | None,
    image_repository: str,
    prometheus_address: str,
) -> None:
    """Render CONFIG into a truss dir, a Docker build context and Kubernetes manifests."""
    target = _package(
        config, output, force, targets, image_repository, prometheus_address, manifests
    )
    click.echo(f"Packaged {config} into {target}")
    for name in ("truss", "docker", "k8s"):
        if (target / name).is_dir():
            click.echo(f"  {name}/")
    if (target / "truss").is_dir():
        click.echo(f"Next: truss push {target / 'truss'}")


@main.command("push", context_settings={"ignore_unknown_options": True})
@config_argument
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Keep the package here (default: a temporary directory).",
)
@force_option
@_with_image_options
@click.argument("truss_args", nargs=-1, type=click.UNPROCESSED)
def push_command(
    config: Path,
    output: Path | None,
    force: bool,
    image_repository: str,
    prometheus_address: str,
    truss_args: tuple[str, ...],
) -> None:
    """Package CONFIG, then `truss push` its truss dir (extra args go to truss push)."""
    with tempfile.TemporaryDirectory(prefix="bisllm-push-") as scratch:
        target = _package(
            config,
            output or Path(scratch) / "package",
            force,
            "truss",
            image_repository,
            prometheus_address,
        )
        try:
            code = push(target / "truss", truss_args)
        except PushError as exc:
            fail(str(exc))
    if code:
        fail(f"truss push exited with status {code}")


main.add_command(generate)
main.add_command(serve)
main.add_command(mirror)
main.add_command(hydrate)
main.add_command(bench)


if __name__ == "__main__":
    main()
