"""`bisllm serve`: the container entrypoint. Validates the config, loads the engine and serves
the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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
@click.option(
    "--workers",
    help="A number N: start N engine workers on this machine behind the KV-aware router "
    "(which listens on --host/--port); MIN..MAX with --autoscale. With --role router: the "
    "workers' HOST:PORT, comma-separated; a name resolving to several addresses (a headless "
    "Service) is all of them.",
)
@click.option(
    "--autoscale",
    is_flag=True,
    help="Start and retire local workers on in-flight tokens (the config's "
    "autoscaling_settings; --workers MIN..MAX overrides min_replica and max_replica).",
)
@click.option(
    "--autoscale-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between autoscaler decisions (each samples the workers' load once).",
)
@click.option(
    "--policy",
    type=click.Choice(["kv", "round_robin", "least_load"]),
    default="kv",
    show_default=True,
    help="Router: how workers are chosen (kv weighs cache hits against load).",
)
@click.option(
    "--router-snapshot",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BISLLM_ROUTER_SNAPSHOT",
    help="Router: a file the KV index is saved to periodically and restored from at start. "
    "Env: BISLLM_ROUTER_SNAPSHOT.",
)
@click.option(
    "--snapshot-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Router: seconds between index snapshots.",
)
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
    autoscale: bool,
    autoscale_interval: float,
    policy: str,
    router_snapshot: Path | None,
    snapshot_interval: float,
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
    if config is None:
        if not DEFAULT_CONFIG.is_file():
            raise click.UsageError(
                "give a CONFIG: the embedded default model ships with a source checkout only"
            )
        config = DEFAULT_CONFIG
    spec, _ = load_spec(config)
    router_options = RouterCLIOptions(
        policy,
        router_snapshot,
        snapshot_interval,
        host,
        port,
        api_key,
        strict_model_name,
        log_level,
        autoscale_interval,
    )
    if role == "router":
        if not workers:
            raise click.UsageError("--role router needs --workers HOST:PORT[,HOST:PORT...]")
        if autoscale:
            raise click.UsageError(
                "--autoscale starts local workers; a --role router is scaled by the KEDA "
                "ScaledObject that `bisllm package` emits (it still reports autoscaler_* metrics)"
            )
        _serve_router(spec, config, workers, router_options)
        return
    manifest_paths = (
        sorted(manifests.glob("*.json"))
        if manifests
        else sorted(config.parent.glob("manifest.*.json"))
    )
    if autoscale and workers is None:
        workers = f"{spec.autoscaling.min_replica}..{spec.autoscaling.max_replica}"
    if workers is not None:
        bounds = _worker_bounds(workers, autoscale)
        _hydrate_weights(manifest_paths, cache)
        extra = [
            "--device",
            device,
            "--dtype",
            dtype,
            "--max-queued-requests",
            str(max_queued_requests),
            "--cache",
            str(cache),
            "--log-level",
            log_level,
        ]
        if manifests:
            extra += ["--manifests", str(manifests)]
        if strict_model_name:
            extra.append("--strict-model-name")
        _serve_fleet(spec, config, bounds, autoscale, extra, router_options)
        return

    import uvicorn

    from bisllm_server.openai.launch import (
        ModelDirectoryError,
        ServeOptions,
        WorkerServer,
        build_server,
    )

    _hydrate_weights(manifest_paths, cache)
    try:
        model_dir = _model_dir(spec, config)
        options = ServeOptions(
            device=device,
            dtype=dtype,
            api_key=api_key,
            max_queued_requests=max_queued_requests,
            strict_model_name=strict_model_name,
            search_roots=_search_roots(config),
        )
        click.echo(f"loading {spec.served_model_name} from {model_dir} ...", err=True)
        app, engine = build_server(spec, model_dir, options)
    except (ModelDirectoryError, ValueError) as exc:
        fail(str(exc))
    try:
        WorkerServer(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises SIGINT after its graceful shutdown; that is a clean exit
    finally:
        engine.shutdown()


class RouterCLIOptions(NamedTuple):
    policy: str
    snapshot: Path | None
    snapshot_interval: float
    host: str
    port: int
    api_key: str | None
    strict_model_name: bool
    log_level: str
    autoscale_interval: float


def _worker_bounds(text: str, autoscale: bool) -> tuple[int, int]:
    """`N` (a fixed fleet) or `MIN..MAX` (with --autoscale) -> (min, max)."""
    low, sep, high = text.partition("..")
    if not (low.isdigit() and (not sep or high.isdigit())):
        raise click.UsageError(
            f"--workers: expected a number of local workers, MIN..MAX with --autoscale (or "
            f"--role router with HOST:PORT addresses), got {text!r}"
        )
    bounds = (int(low), int(high) if sep else int(low))
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise click.UsageError(
            f"--workers: need 1 <= MIN <= MAX (the autoscaler never scales to zero), got {text!r}"
        )
    if sep and not autoscale:
        raise click.UsageError(f"--workers {text}: a range needs --autoscale")
    if autoscale and not sep:
        raise click.UsageError(f"--autoscale needs --workers MIN..MAX, got {text!r}")
    return bounds


def _router_service(spec, config: Path, workers: str, options: RouterCLIOptions) -> Any:  # type: ignore[no-untyped-def]
    from bisllm_server.engine.engine import load_tokenizer
    from bisllm_server.openai.launch import ModelDirectoryError
    from bisllm_server.router.config import RouterConfig
    from bisllm_server.router.discovery import WorkerSpecError
    from bisllm_server.router.prompts import PromptTokenizer
    from bisllm_server.router.service import RouterOptions, RouterService

    try:
        tokenizer = load_tokenizer(_model_dir(spec, config))
    except ModelDirectoryError:
        tokenizer = None  # a router pod without the weights asks the workers to tokenize
        click.echo("router: no local checkpoint; prompts are tokenized by the workers", err=True)
    router_config = RouterConfig.from_mapping(spec.routing.model_dump(), policy=options.policy)
    try:
        return RouterService(
            router_config,
            RouterOptions(
                workers=workers,
                served_model_name=spec.served_model_name,
                api_key=options.api_key,
                strict_model_name=options.strict_model_name,
                snapshot_path=options.snapshot,
                snapshot_interval_s=options.snapshot_interval,
            ),
            PromptTokenizer(tokenizer),
        )
    except WorkerSpecError as exc:
        raise click.UsageError(str(exc)) from None


def _serve_router(
    spec,
    config: Path,
    workers: str,
    options: RouterCLIOptions,
    on_stop: Callable[[], None] | None = None,
    fleet: Any = None,
    bounds: tuple[int, int] | None = None,
) -> None:  # type: ignore[no-untyped-def]
    """The router; with `fleet` and `bounds` its planner also starts and retires the fleet's
    workers (otherwise it only reports what it would do)."""
    import uvicorn

    from bisllm_server.autoscaler.local import LocalActuator
    from bisllm_server.autoscaler.planner import attach_planner
    from bisllm_server.autoscaler.policy import Autoscaler, AutoscalerSettings
    from bisllm_server.router.app import create_router_app

    # The router's own decisions (workers joining, leaving, scaling) in the process log.
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("bisllm").setLevel(options.log_level.upper())
    service = _router_service(spec, config, workers, options)
    overrides = {} if bounds is None else {"min_replica": bounds[0], "max_replica": bounds[1]}
    settings = AutoscalerSettings.from_spec(spec.autoscaling, **overrides)
    running = len(workers.split(","))
    attach_planner(
        service,
        Autoscaler(settings, initial_replicas=running),
        interval_s=options.autoscale_interval,
        actuator=None if bounds is None else LocalActuator(fleet, service),
    )
    click.echo(
        f"router ({options.policy}) for {workers} on {options.host}:{options.port}", err=True
    )
    app = create_router_app(service, on_stop=on_stop)
    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level)


def _serve_fleet(
    spec,
    config: Path,
    bounds: tuple[int, int],
    autoscale: bool,
    extra: list[str],
    options: RouterCLIOptions,
) -> None:  # type: ignore[no-untyped-def]
    from bisllm_server.router.fleet import WorkerFleet, worker_command

    env = dict(os.environ)
    if options.api_key:
        env["BISLLM_API_KEY"] = options.api_key
    fleet = WorkerFleet(bounds[0], worker_command(str(config), extra), env=env, max_count=bounds[1])
    fleet.start()
    try:
        # The workers stop inside the router's graceful shutdown: after it, uvicorn re-raises
        # SIGTERM, which ends this process before any `finally` here could run.
        _serve_router(
            spec,
            config,
            ",".join(fleet.addresses),
            options,
            on_stop=fleet.stop,
            fleet=fleet if autoscale else None,
            bounds=bounds if autoscale else None,
        )
    finally:
        fleet.stop()  # start-up failures and Ctrl-C


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

    return resolve_model_dir(spec, _search_roots(config))


def _search_roots(config: Path) -> list[Path]:
    # A LOCAL checkpoint path (or an Eagle head's) is relative to the working directory, the
    # config's directory or, for the examples, this source checkout.
    return [Path.cwd(), config.resolve().parent, DEFAULT_CONFIG.parents[2]]
