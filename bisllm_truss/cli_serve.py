"""`bisllm serve`: the container entrypoint. Validates the config, loads the engine and serves
the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bisllm_truss.cli_common import fail, load_spec

# The embedded default model's config, served when no config is given (a source checkout).
DEFAULT_CONFIG = (
    Path(__file__).resolve().parents[1] / "examples" / "bisllm-tiny-moe" / "config.yaml"
)


@click.command()
@click.argument(
    "config", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--role",
    type=click.Choice(["worker", "router"]),
    default="worker",
    show_default=True,
    help="worker: an engine; router: the KV-aware router in front of --workers.",
)
@click.option("--workers", help="Router only: the workers' HOST:PORT.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="BISLLM_API_KEY",
    help="Require this key (Authorization: Bearer KEY or Api-Key: KEY). Env: BISLLM_API_KEY.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True, help="auto, bf16, fp16 or fp32.")
@click.option(
    "--max-queued-requests",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Requests allowed to wait beyond the running batch before new ones get 503 "
    "with Retry-After.",
)
@click.option(
    "--strict-model-name",
    is_flag=True,
    help="Answer 404 to requests naming another model (default: accept any name).",
)
@click.option(
    "--manifests",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BISLLM_MANIFESTS",
    help="A directory of weights manifests (from bisllm mirror) to hydrate before loading. "
    "Default: the manifest.*.json files next to CONFIG (where the packaged ConfigMap puts "
    "them). Env: BISLLM_MANIFESTS.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BISLLM_CACHE_DIR",
    default=Path("/models/.bisllm-cache"),
    show_default=True,
    help="Node cache for hydration; on the mounts' filesystem so files are hardlinked.",
)
@click.option("--log-level", default="info", show_default=True)
def serve(
    config: Path | None,
    role: str,
    workers: str | None,
    host: str,
    port: int,
    api_key: str | None,
    device: str,
    dtype: str,
    max_queued_requests: int,
    strict_model_name: bool,
    manifests: Path | None,
    cache: Path,
    log_level: str,
) -> None:
    """Serve CONFIG's model (default: the embedded default model) over the OpenAI API."""
    if role == "router":
        fail(
            "--role router needs the KV-aware router, which is not implemented yet; "
            "serve a worker and send requests to it directly"
        )
    if workers is not None:
        raise click.UsageError("--workers goes with --role router")
    if config is None:
        if not DEFAULT_CONFIG.is_file():
            raise click.UsageError(
                "give a CONFIG: the embedded default model ships with a source checkout only"
            )
        config = DEFAULT_CONFIG
    spec, _ = load_spec(config)

    import uvicorn

    from bisllm_server.openai.launch import ModelDirectoryError, ServeOptions, build_server

    _hydrate_weights(
        sorted(manifests.glob("*.json"))
        if manifests
        else sorted(config.parent.glob("manifest.*.json")),
        cache,
    )
    try:
        model_dir = _model_dir(spec, config)
        options = ServeOptions(
            device=device,
            dtype=dtype,
            api_key=api_key,
            max_queued_requests=max_queued_requests,
            strict_model_name=strict_model_name,
        )
        click.echo(f"loading {spec.served_model_name} from {model_dir} ...", err=True)
        app, engine = build_server(spec, model_dir, options)
    except (ModelDirectoryError, ValueError) as exc:
        fail(str(exc))
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.shutdown()


def _hydrate_weights(paths: list[Path], cache: Path) -> None:
    """Deliver every manifest's files to its mount before the model loads (the container
    entrypoint's job): already-hydrated files cost a hardlink check, nothing is refetched."""
    if not paths:
        return
    from bisllm_bdn.hydrate import hydrate
    from bisllm_bdn.manifest import Manifest, ManifestError
    from bisllm_bdn.store import StoreError, open_store

    for path in paths:
        try:
            manifest = Manifest.load(path)
            summary = hydrate(
                manifest,
                Path(manifest.mount_location),
                cache,
                store=open_store(manifest.store),
                progress=sys.stderr.isatty(),
            )
        except (ManifestError, StoreError, OSError, ValueError) as exc:
            fail(f"hydrating {path}: {exc}")
        click.echo(f"hydrated {manifest.mount_location}: {summary.to_json()}", err=True)


def _model_dir(spec, config: Path) -> Path:  # type: ignore[no-untyped-def]
    from bisllm_server.openai.launch import resolve_model_dir

    # A LOCAL checkpoint path is relative to the working directory, the config's directory
    # or, for the examples, this source checkout.
    roots = [Path.cwd(), config.resolve().parent, DEFAULT_CONFIG.parents[2]]
    return resolve_model_dir(spec, roots)
