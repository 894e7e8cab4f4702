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
    type=click.Choice(["worker", "router", "prefill", "decode"]),
    default="worker",
    show_default=True,
    help="worker: an engine; router: the KV-aware router in front of --workers; prefill / "
    "decode: an engine announced to the router in that pool of a disaggregated deployment.",
)
@click.option(
    "--disaggregated",
    is_flag=True,
    help="Start one replication unit on this machine: the config's b10_disagg_config prefill "
    "and decode workers behind the router (with --autoscale, MIN..MAX units, each pool scaled "
    "on its own in-flight tokens).",
)
@click.option(
    "--max-local-prefill-tokens",
    type=click.IntRange(min=0),
    default=512,
    show_default=True,
    help="Router, disaggregated: prompts with at most this many tokens not cached on their "
    "decode worker are prefilled there, not on a prefill worker.",
)
@click.option(
    "--max-prefill-queue",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Router, disaggregated: prefill locally when every prefill worker has this many "
    "requests in flight (0: never).",
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
@click.option(
    "--no-router",
    is_flag=True,
    help="DP attention: serve each attention rank on PORT + its local rank, with no router in "
    "front (a router elsewhere lists every rank; `bisllm package` emits that form).",
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    envvar="NNODES",
    help="Nodes one engine replica spans (the config's, checked). Env: NNODES.",
)
@click.option(
    "--node-rank",
    type=click.IntRange(min=0),
    envvar="NODE_RANK",
    default=0,
    show_default=True,
    help="This node's place among them; node 0 hosts the rendezvous. Env: NODE_RANK.",
)
@click.option(
    "--master-addr",
    envvar="MASTER_ADDR",
    help="Node 0's address for the ranks' rendezvous (needed with several nodes). "
    "Env: MASTER_ADDR.",
)
@click.option(
    "--master-port",
    type=click.IntRange(1, 65535),
    envvar="MASTER_PORT",
    help="The rendezvous port (default: 29500 with several nodes, a free one on one node). "
    "Env: MASTER_PORT.",
)
@click.option("--log-level", default="info", show_default=True)
def serve(
    config: Path | None,
    role: str,
    disaggregated: bool,
    max_local_prefill_tokens: int,
    max_prefill_queue: int,
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
    no_router: bool,
    nnodes: int | None,
    node_rank: int,
    master_addr: str | None,
    master_port: int | None,
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
        max_local_prefill_tokens,
        max_prefill_queue,
    )
    if disaggregated and (role != "worker" or workers is not None):
        raise click.UsageError(
            "--disaggregated starts a whole unit (router, prefill and decode workers); it takes "
            "no --role or --workers (the unit's sizes come from b10_disagg_config)"
        )
    if disaggregated and not spec.disaggregation.enabled:
        raise click.UsageError(
            f"--disaggregated: {config} does not enable disaggregation; set "
            "llm_config.is_disaggregated: true and b10_disagg_config: "
            "{prefill_workers_per_replica: P, decode_workers_per_replica: D}"
        )
    parallel = _parallel_config(spec)
    ranked = parallel.world_size > 1
    dp_attention = ranked and parallel.attention_dp_size > 1 and role != "router"
    if dp_attention and workers is not None:
        raise click.UsageError(
            "--workers with enable_attention_dp: each replica already serves one worker per "
            "attention rank behind the router; run replicas as separate `bisllm serve` processes"
        )
    if dp_attention and disaggregated:
        raise click.UsageError(
            "--disaggregated with enable_attention_dp: every rank is a worker of its pool; start "
            "each pool's replicas with --role prefill|decode --no-router behind --role router"
        )
    if dp_attention and role in ("prefill", "decode") and not no_router:
        raise click.UsageError(
            f"--role {role} with enable_attention_dp needs --no-router: each rank is a "
            f"{role} worker on its own port (PORT + local rank), listed to the router"
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
    if autoscale and workers is None and not disaggregated:
        workers = f"{spec.autoscaling.min_replica}..{spec.autoscaling.max_replica}"
    if workers is not None or disaggregated:
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
        if disaggregated:
            _serve_unit(spec, config, autoscale, extra, router_options)
        else:
            assert workers is not None
            bounds = _worker_bounds(workers, autoscale)
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
            role="both" if role == "worker" else role,
        )
        if ranked:
            node = RankNode(nnodes, node_rank, master_addr, master_port, no_router)
            _serve_ranks(spec, model_dir, options, parallel, node, router_options, config)
            return
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
    max_local_prefill_tokens: int
    max_prefill_queue: int


class ScaledPool(NamedTuple):
    """Workers the router's autoscaler sizes as one: an aggregated deployment's only pool,
    or a disaggregated one's prefill or decode pool."""

    name: str  # workers | prefill | decode
    role: str | None  # the workers' announced role (None: every worker)
    initial: int
    fleet: Any = None  # a local WorkerFleet the planner starts and retires workers of
    bounds: tuple[int, int] | None = None  # with a fleet: (min, max) workers


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
    router_config = RouterConfig.from_mapping(
        spec.routing.model_dump(),
        policy=options.policy,
        disagg_max_local_prefill_tokens=options.max_local_prefill_tokens,
        disagg_max_prefill_queue=options.max_prefill_queue,
    )
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
    pools: list[ScaledPool] | None = None,
) -> None:  # type: ignore[no-untyped-def]
    """The router, with an autoscaler planner per pool: one that starts and retires workers
    for a pool with a local fleet, one that only reports what it would do otherwise."""
    import uvicorn

    from bisllm_server.autoscaler.local import LocalActuator
    from bisllm_server.autoscaler.metrics import AutoscalerMetrics
    from bisllm_server.autoscaler.planner import attach_planner
    from bisllm_server.autoscaler.policy import Autoscaler, AutoscalerSettings
    from bisllm_server.router.app import create_router_app

    # The router's own decisions (workers joining, leaving, scaling) in the process log.
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("bisllm").setLevel(options.log_level.upper())
    service = _router_service(spec, config, workers, options)
    if pools is None:
        pools = _advisory_pools(spec, len(workers.split(",")))
    metrics = AutoscalerMetrics(service.metrics.registry, spec.served_model_name)
    for pool in pools:
        if pool.bounds is not None:
            overrides = {"min_replica": pool.bounds[0], "max_replica": pool.bounds[1]}
        elif pool.role is not None:  # advisory: the config's unit range, in this pool's workers
            n, a = _per_unit(spec, pool.role), spec.autoscaling
            overrides = {"min_replica": a.min_replica * n, "max_replica": a.max_replica * n}
        else:
            overrides = {}
        settings = AutoscalerSettings.from_spec(spec.autoscaling, **overrides)
        attach_planner(
            service,
            Autoscaler(settings, initial_replicas=pool.initial),
            interval_s=options.autoscale_interval,
            actuator=None if pool.fleet is None else LocalActuator(pool.fleet, service),
            pool=pool.name,
            members=None if pool.role is None else service.router.members(pool.role),
            metrics=metrics,
        )
    click.echo(
        f"router ({options.policy}) for {workers} on {options.host}:{options.port}", err=True
    )
    app = create_router_app(service, on_stop=on_stop)
    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level)


def _per_unit(spec, role: str) -> int:  # type: ignore[no-untyped-def]
    d = spec.disaggregation
    return d.prefill_workers_per_replica if role == "prefill" else d.decode_workers_per_replica


def _advisory_pools(spec, running: int) -> list[ScaledPool]:  # type: ignore[no-untyped-def]
    """A standalone router's pools: prefill and decode when the config disaggregates (the
    workers announce their role), else one pool of every worker."""
    if not spec.disaggregation.enabled:
        return [ScaledPool("workers", None, running)]
    return [
        ScaledPool(role, role, _per_unit(spec, role) * spec.autoscaling.min_replica)
        for role in ("prefill", "decode")
    ]


def _serve_fleet(
    spec,
    config: Path,
    bounds: tuple[int, int],
    autoscale: bool,
    extra: list[str],
    options: RouterCLIOptions,
) -> None:  # type: ignore[no-untyped-def]
    from bisllm_server.router.fleet import WorkerFleet, worker_command

    fleet = WorkerFleet(
        bounds[0],
        worker_command(str(config), extra),
        env=_worker_env(options),
        max_count=bounds[1],
    )
    fleet.start()
    pool = ScaledPool(
        "workers",
        None,
        bounds[0],
        fleet if autoscale else None,
        bounds if autoscale else None,
    )
    try:
        # The workers stop inside the router's graceful shutdown: after it, uvicorn re-raises
        # SIGTERM, which ends this process before any `finally` here could run.
        _serve_router(
            spec, config, ",".join(fleet.addresses), options, on_stop=fleet.stop, pools=[pool]
        )
    finally:
        fleet.stop()  # start-up failures and Ctrl-C


def _serve_unit(
    spec,
    config: Path,
    autoscale: bool,
    extra: list[str],
    options: RouterCLIOptions,
) -> None:  # type: ignore[no-untyped-def]
    """`--disaggregated`: a prefill fleet and a decode fleet behind one router. With
    --autoscale each pool ranges over min_replica..max_replica units of its own size."""
    from bisllm_server.router.fleet import WorkerFleet, worker_command

    a = spec.autoscaling
    units = (a.min_replica, a.max_replica) if autoscale else (1, 1)
    sizes = {role: _per_unit(spec, role) for role in ("prefill", "decode")}
    env = _worker_env(options, most=sum(n * units[1] for n in sizes.values()))
    fleets = {
        role: WorkerFleet(
            n * units[0],
            worker_command(str(config), extra, role=role),
            env=env,
            max_count=n * units[1],
        )
        for role, n in sizes.items()
    }
    for fleet in fleets.values():
        fleet.start()

    def stop() -> None:
        for fleet in fleets.values():
            fleet.stop()

    pools = [
        ScaledPool(
            role,
            role,
            sizes[role] * units[0],
            fleets[role] if autoscale else None,
            (sizes[role] * units[0], sizes[role] * units[1]) if autoscale else None,
        )
        for role in fleets
    ]
    click.echo(
        f"disaggregated unit: {sizes['prefill']} prefill : {sizes['decode']} decode workers"
        + (f", {units[0]}..{units[1]} units" if autoscale else ""),
        err=True,
    )
    addresses = ",".join(a for fleet in fleets.values() for a in fleet.addresses)
    try:
        _serve_router(spec, config, addresses, options, on_stop=stop, pools=pools)
    finally:
        stop()


def _worker_env(options: RouterCLIOptions, most: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if options.api_key:
        env["BISLLM_API_KEY"] = options.api_key
    if most is not None:
        # Split the cores between every worker of every pool (a fleet alone splits them
        # between its own).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // most)))
    return env


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


def _parallel_config(spec) -> Any:  # type: ignore[no-untyped-def]
    """The engine replica's parallel layout (tensor, expert, attention-DP sizes; nodes)."""
    from bisllm_server.engine.parallel.state import ParallelConfig, ParallelConfigError

    try:
        return ParallelConfig.from_spec(spec.parallel, spec.hardware)
    except ParallelConfigError as exc:
        fail(str(exc))


class RankNode(NamedTuple):
    """Where this process's ranks sit in a multi-node replica (torchrun's variables)."""

    nnodes: int | None
    node_rank: int
    master_addr: str | None
    master_port: int | None
    no_router: bool


def _serve_ranks(
    spec,
    model_dir: Path,
    options: Any,
    parallel: Any,
    node: RankNode,
    router_options: RouterCLIOptions,
    config: Path,
) -> None:  # type: ignore[no-untyped-def]
    """A replica of several ranks: this node's rank processes (rank 0 serving a tensor-parallel
    replica; every rank serving under DP attention), and on one node with DP attention the
    KV-aware router in front of the ranks, unless --no-router."""
    import signal
    import threading

    from bisllm_server.engine.parallel.launch import (
        LaunchError,
        free_port,
        from_env,
        node_main,
    )
    from bisllm_server.engine.parallel.state import ParallelConfigError, default_backend
    from bisllm_server.openai.ranks import RankServeArgs, serve_rank
    from bisllm_server.router.fleet import free_ports

    environ = {"NODE_RANK": str(node.node_rank)}
    for name, value in (
        ("NNODES", node.nnodes),
        ("MASTER_ADDR", node.master_addr),
        ("MASTER_PORT", node.master_port),
    ):
        if value is not None:
            environ[name] = str(value)
    if parallel.node_count == 1 and node.master_port is None:
        environ["MASTER_PORT"] = str(free_port())
    try:
        where = from_env(parallel, environ)
    except ParallelConfigError as exc:
        raise click.UsageError(str(exc)) from None
    dp = parallel.attention_dp_size > 1
    local_router = dp and not node.no_router
    if local_router and parallel.node_count > 1:
        raise click.UsageError(
            "enable_attention_dp over several nodes: every rank serves its own port; start each "
            "node with --no-router and a router listing them (bisllm serve --role router)"
        )
    procs = parallel.procs_per_node
    if local_router:
        host, ports = "127.0.0.1", free_ports(procs)
    else:
        host = router_options.host
        ports = [router_options.port + i for i in range(procs)] if dp else [router_options.port]
    args = RankServeArgs(spec, model_dir, options, host, ports, router_options.log_level)
    device = options.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    stop = threading.Event()
    shape = f"tp={parallel.tp_size} ep={parallel.ep_size} attention_dp={parallel.attention_dp_size}"
    click.echo(
        f"loading {spec.served_model_name} from {model_dir} on {procs} ranks of node "
        f"{where.node_rank}/{where.node_count} ({shape}) ...",
        err=True,
    )

    def launch() -> None:
        node_main(
            serve_rank,
            parallel,
            node_rank=where.node_rank,
            master_addr=where.master_addr,
            master_port=where.master_port,
            args=(args,),
            backend=default_backend(device),
            stop=stop,
        )

    if not local_router:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            launch()
        except LaunchError as exc:
            fail(str(exc))
        return

    failure: list[LaunchError] = []

    def run_ranks() -> None:
        try:
            launch()
        except LaunchError as exc:
            failure.append(exc)
        if not stop.is_set():
            # A replica that lost a rank serves nothing: exit, as a pod would, to be restarted.
            click.echo(
                f"bisllm serve: the ranks stopped: {failure[0] if failure else 'exit'}", err=True
            )
            os._exit(1)

    ranks = threading.Thread(target=run_ranks, name="ranks", daemon=True)
    ranks.start()

    def stop_ranks() -> None:
        stop.set()
        ranks.join()

    addresses = ",".join(f"127.0.0.1:{port}" for port in ports)
    # uvicorn re-raises the signal that stopped the router once it has shut down (and the
    # ranks with it); a no-op handler lets this process exit 0 after that.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        _serve_router(spec, config, addresses, router_options, on_stop=stop_ranks)
    finally:
        stop_ranks()
