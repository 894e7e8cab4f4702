"""`bisllm mirror` and `bisllm hydrate`: the two halves of BDN-style weight delivery.

mirror (ahead of time, anywhere with access to the sources): every `weights` source of a
config → content-addressed origin store + one manifest per source.
hydrate (on the node, before the server starts): manifest → node cache → read-only mount.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from bisllm_truss.cli_common import fail, load_spec

DEFAULT_CACHE = "/var/cache/bisllm"


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--store",
    "store_uri",
    required=True,
    help="Origin store: a directory (or file:///dir) or s3://bucket/prefix.",
)
@click.option(
    "--manifests",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("manifests"),
    show_default=True,
    help="Where to write one manifest per weights source.",
)
@click.option(
    "--secrets-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BISLLM_SECRETS_DIR",
    default=Path("/secrets"),
    show_default=True,
    help="Directory of secret files, one per secret name.",
)
@click.option("--store-endpoint", envvar="BISLLM_STORE_ENDPOINT", help="S3 endpoint of the store.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary per source.")
def mirror(
    config: Path,
    store_uri: str,
    manifests: Path,
    secrets_dir: Path,
    store_endpoint: str | None,
    as_json: bool,
) -> None:
    """Mirror CONFIG's weights sources into an origin store and write their manifests."""
    from bisllm_bdn.auth import SecretStore
    from bisllm_bdn.mirror import mirror_mount
    from bisllm_bdn.sources import SourceError
    from bisllm_bdn.store import StoreError, open_store

    spec, _ = load_spec(config)
    mounts = spec.weights
    if not mounts:
        fail(f"{config} declares no weights to mirror")
    try:
        store = open_store(store_uri, endpoint_url=store_endpoint)
        for mount in mounts:
            outcome = mirror_mount(
                mount,
                store,
                manifests,
                secrets=SecretStore(secrets_dir),
                base_dir=config.resolve().parent,
            )
            if as_json:
                click.echo(json.dumps(outcome.to_dict()))
            else:
                click.echo(
                    f"{mount.source} -> {outcome.manifest_path}: {outcome.files} files, "
                    f"{outcome.bytes_total / 1e6:.1f} MB, sent {outcome.bytes_sent / 1e6:.1f} MB "
                    f"in {outcome.seconds:.1f}s"
                )
    except (SourceError, StoreError, ValueError) as exc:
        fail(str(exc))


@click.command()
@click.argument("manifests", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--to",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    help="Mount directory (default: each manifest's mount_location). One manifest only.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BISLLM_CACHE_DIR",
    default=Path(DEFAULT_CACHE),
    show_default=True,
    help="Node cache (GPU-local disk); must be on the mount's filesystem for hardlinks.",
)
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--store-endpoint", envvar="BISLLM_STORE_ENDPOINT", help="S3 endpoint of the store.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary per manifest.")
def hydrate(
    manifests: tuple[Path, ...],
    target: Path | None,
    cache: Path,
    workers: int,
    store_endpoint: str | None,
    as_json: bool,
) -> None:
    """Fetch MANIFESTS' files into the node cache and hardlink them into their mount."""
    from bisllm_bdn.hydrate import hydrate as run_hydrate
    from bisllm_bdn.manifest import Manifest, ManifestError
    from bisllm_bdn.store import StoreError, open_store

    files = [p for m in manifests for p in (sorted(m.glob("*.json")) if m.is_dir() else [m])]
    if target is not None and len(files) != 1:
        raise click.UsageError("--to needs exactly one manifest")
    try:
        for path in files:
            manifest = Manifest.load(path)
            store = open_store(manifest.store, endpoint_url=store_endpoint)
            summary = run_hydrate(
                manifest,
                target or Path(manifest.mount_location),
                cache,
                store=store,
                workers=workers,
                progress=not as_json and os.isatty(2),
            )
            if as_json:
                click.echo(summary.to_json())
            else:
                click.echo(
                    f"{path}: {summary.files} files, {summary.bytes_total / 1e6:.1f} MB, "
                    f"fetched {summary.bytes_fetched / 1e6:.1f} MB ({summary.cache_hits} cache "
                    f"hits) in {summary.seconds:.1f}s, {summary.throughput_mb_s:.0f} MB/s"
                )
    except (ManifestError, StoreError, OSError, ValueError) as exc:
        fail(str(exc))
