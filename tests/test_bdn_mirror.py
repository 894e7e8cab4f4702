"""Mirror → hydrate end to end against loopback servers: sources (S3 via moto, an HTTP server
with Range support, a fake HF hub, a directory) into an origin store (a directory or S3), then
into a node cache and a mount; and the `bisllm mirror` / `bisllm hydrate` commands."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from click.testing import CliRunner

from bisllm_bdn.auth import SecretStore
from bisllm_bdn.hydrate import hydrate
from bisllm_bdn.manifest import Manifest
from bisllm_bdn.mirror import config_hash, mirror_mount
from bisllm_bdn.sources import Endpoints
from bisllm_bdn.store import LocalStore, open_store
from bisllm_truss.cli import main

if TYPE_CHECKING:
    from bdn_servers import FakeHub, MotoS3, RangeServer

pytest_plugins = ["bdn_servers"]


@dataclass
class Mount:
    """The fields of a spec WeightsMount that mirroring reads."""

    source: str
    mount_location: str
    secret_name: str | None = None
    auth: dict | None = None
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None


def shard_files(seed: int = 0) -> dict[str, bytes]:
    rng = __import__("random").Random(seed)
    return {
        "config.json": b'{"model_type": "qwen3_moe"}',
        "model-00001-of-00002.safetensors": rng.randbytes(3 << 20),
        "model-00002-of-00002.safetensors": rng.randbytes(1 << 20) + b"tail",
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        "extras/notes.md": b"not wanted",
    }


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def s3_secrets(tmp_path: Path, moto: MotoS3) -> SecretStore:
    directory = tmp_path / "secrets"
    directory.mkdir(exist_ok=True)
    (directory / "s3-creds").write_text(json.dumps(moto.secret))
    return SecretStore(directory)


def test_s3_source_mirrors_and_hydrates_byte_identical(tmp_path: Path, moto_s3_server: MotoS3):
    files = shard_files()
    moto_s3_server.put_files("weights", {f"release/v1/{k}": v for k, v in files.items()})
    mount = Mount(
        source="s3://weights/release/v1",
        mount_location="/models/checkpoint",
        secret_name="s3-creds",
        ignore_patterns=["extras/**"],
    )
    store = LocalStore(tmp_path / "origin")
    endpoints = Endpoints(s3=moto_s3_server.endpoint)
    secrets = s3_secrets(tmp_path, moto_s3_server)
    first = mirror_mount(mount, store, tmp_path / "manifests", secrets=secrets, endpoints=endpoints)
    wanted = {k: v for k, v in files.items() if not k.startswith("extras/")}
    assert first.files == len(wanted) and first.bytes_sent == sum(map(len, wanted.values()))
    manifest = Manifest.load(first.manifest_path)
    assert manifest.config_hash == config_hash(mount) and manifest.store == store.uri
    assert {f.path for f in manifest.files} == set(wanted)
    assert all(f.etag for f in manifest.files)  # S3 etags, for the next mirror's dedup

    target = tmp_path / "mount"
    summary = hydrate(manifest, target, tmp_path / "cache", progress=False)
    assert tree_bytes(target) == wanted
    assert summary.bytes_fetched == sum(map(len, wanted.values()))

    # Mirroring again: etags unchanged and blobs present, so nothing is read or sent.
    again = mirror_mount(mount, store, tmp_path / "manifests", secrets=secrets, endpoints=endpoints)
    assert (again.bytes_read, again.bytes_sent, again.blobs_sent) == (0, 0, 0)
    assert Manifest.load(again.manifest_path).files == manifest.files

    # A changed file is re-read; unchanged ones are not, and only the new blob is sent.
    changed = b"new tokenizer"
    moto_s3_server.put_files("weights", {"release/v1/tokenizer/tokenizer.json": changed})
    third = mirror_mount(mount, store, tmp_path / "manifests", secrets=secrets, endpoints=endpoints)
    assert (third.bytes_read, third.bytes_sent, third.blobs_sent) == (len(changed),) * 2 + (1,)


def test_https_archive_into_an_s3_store(
    tmp_path: Path, range_server: RangeServer, moto_s3_server: MotoS3
):
    """A REMOTE_URL .tar.gz checkpoint, mirrored into an S3 origin, hydrated with ranged
    reads from S3."""
    files = shard_files(1)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"ckpt/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "ckpt.tar.gz").write_bytes(buffer.getvalue())
    client = moto_s3_server.client()
    client.create_bucket(Bucket="origin")
    store = open_store(
        "s3://origin/bdn", credentials=moto_s3_server.secret, endpoint_url=moto_s3_server.endpoint
    )
    mount = Mount(source=range_server.url_for("ckpt.tar.gz"), mount_location="/models/ckpt")
    result = mirror_mount(mount, store, tmp_path / "manifests")
    manifest = Manifest.load(result.manifest_path)
    paths = {f.path for f in manifest.files}
    assert len(paths) == len(files) and all(p.endswith(tuple(files)) for p in paths)
    target = tmp_path / "mount"
    hydrate(manifest, target, tmp_path / "cache", store=store, progress=False, chunk_bytes=1 << 20)
    got = tree_bytes(target)
    assert sorted(got.values()) == sorted(files.values())


def test_hf_branch_is_pinned_to_its_commit(tmp_path: Path, fake_hub_server: FakeHub):
    repo = fake_hub_server.add_repo("acme/tiny")
    sha = repo.commit({"config.json": b"{}", "model.safetensors": b"w" * 1000})
    mount = Mount(source="hf://acme/tiny@main", mount_location="/models/tiny")
    endpoints = Endpoints(hf=fake_hub_server.url)
    result = mirror_mount(
        mount, LocalStore(tmp_path / "origin"), tmp_path / "m", endpoints=endpoints
    )
    assert result.manifest.revision == sha
    # A later commit to main does not change what the manifest (and so every scale-up) serves.
    repo.commit({"config.json": b'{"new": 1}', "model.safetensors": b"x" * 10})
    target = tmp_path / "mount"
    hydrate(Manifest.load(result.manifest_path), target, tmp_path / "cache", progress=False)
    assert (target / "config.json").read_bytes() == b"{}"


def test_directory_source_and_cli_round_trip(tmp_path: Path):
    """`bisllm mirror` over a config's weights, then `bisllm hydrate --to`."""
    source = tmp_path / "src"
    for name, data in shard_files(2).items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    config = yaml.safe_load(
        (Path(__file__).parent.parent / "examples" / "bisllm-tiny-moe" / "config.yaml").read_text()
    )
    config["weights"] = [
        {
            "source": f"file://{source}",
            "mount_location": "/models/extra",
            "allow_patterns": ["*.json", "*.safetensors", "tokenizer/**"],
        }
    ]
    checkpoint = Path(__file__).parent.parent / "examples" / "bisllm-tiny-moe" / "checkpoint"
    config["trt_llm"]["build"]["checkpoint_repository"]["repo"] = str(checkpoint)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    origin, manifests = tmp_path / "origin", tmp_path / "manifests"
    args = [
        "mirror",
        str(config_path),
        "--store",
        str(origin),
        "--manifests",
        str(manifests),
        "--json",
    ]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    reports = [json.loads(line) for line in result.output.splitlines()]
    mirrored = {r["source"]: r for r in reports}
    assert mirrored[f"file://{source}"]["files"] == 4
    assert mirrored[f"file://{checkpoint}"]["files"] == len(list(checkpoint.iterdir()))
    again = runner.invoke(main, args)
    assert all(json.loads(line)["bytes_sent"] == 0 for line in again.output.splitlines())

    manifest_path = manifests / "models-extra.json"
    target, cache = tmp_path / "mount", tmp_path / "cache"
    out = runner.invoke(
        main,
        ["hydrate", str(manifest_path), "--to", str(target), "--cache", str(cache), "--json"],
    )
    assert out.exit_code == 0, out.output
    summary = json.loads(out.output.splitlines()[-1])
    assert summary["files"] == 4 and summary["cache_hits"] == 0
    expected = {k: v for k, v in shard_files(2).items() if not k.startswith("extras/")}
    assert tree_bytes(target) == expected
    # Read-only mount, hardlinked to the node cache.
    config_file = target / "config.json"
    assert not os.access(config_file, os.W_OK) or os.geteuid() == 0
    assert config_file.stat().st_mode & 0o222 == 0 and config_file.stat().st_nlink >= 2
    # A second node start on the same cache only links: nothing fetched.
    warm = runner.invoke(
        main,
        [
            "hydrate",
            str(manifest_path),
            "--to",
            str(tmp_path / "mount2"),
            "--cache",
            str(cache),
            "--json",
        ],
    )
    assert json.loads(warm.output.splitlines()[-1])["bytes_fetched"] == 0


def test_bad_credentials_name_the_source(tmp_path: Path, moto_s3_server: MotoS3):
    moto_s3_server.put_files("weights", {"m/config.json": b"{}"})
    directory = tmp_path / "secrets"
    directory.mkdir()
    (directory / "s3-creds").write_text(
        json.dumps({"aws_access_key_id": "AKIAWRONG", "aws_secret_access_key": "not-the-key"})
    )
    mount = Mount(source="s3://weights/m", mount_location="/models/m", secret_name="s3-creds")
    with moto_s3_server.require_auth(), pytest.raises(Exception) as err:
        mirror_mount(
            mount,
            LocalStore(tmp_path / "origin"),
            tmp_path / "manifests",
            secrets=SecretStore(directory),
            endpoints=Endpoints(s3=moto_s3_server.endpoint),
        )
    message = str(err.value)
    assert "s3://weights/m" in message and "not-the-key" not in message


def test_serve_hydrates_manifests_before_loading(tmp_path: Path):
    """The container entrypoint (`bisllm serve`) delivers every manifest's files to its mount
    first; a second start only re-checks the links."""
    from bisllm_truss.cli_serve import _hydrate_weights

    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_bytes(b'{"a": 1}')
    mount_dir = tmp_path / "models" / "checkpoint"
    mount = Mount(source=f"file://{source}", mount_location=str(mount_dir))
    manifests = tmp_path / "manifests"
    result = mirror_mount(mount, LocalStore(tmp_path / "origin"), manifests)
    _hydrate_weights([result.manifest_path], tmp_path / "models" / ".cache")
    assert (mount_dir / "config.json").read_bytes() == b'{"a": 1}'
    inode = (mount_dir / "config.json").stat().st_ino
    _hydrate_weights([result.manifest_path], tmp_path / "models" / ".cache")
    assert (mount_dir / "config.json").stat().st_ino == inode


def test_packaged_configmap_carries_the_manifests(tmp_path: Path):
    """`bisllm package --manifests` puts them next to the config in the ConfigMap, where
    `bisllm serve` finds them by default."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_bytes(b"{}")
    manifests = tmp_path / "manifests"
    mount = Mount(source=f"file://{source}", mount_location="/models/checkpoint")
    result = mirror_mount(mount, LocalStore(tmp_path / "origin"), manifests)
    example = Path(__file__).parent.parent / "examples" / "qwen3-30b-a3b-h100.yaml"
    out = tmp_path / "pkg"
    packaged = CliRunner().invoke(
        main,
        ["package", str(example), "-o", str(out), "--target", "k8s", "--manifests", str(manifests)],
    )
    assert packaged.exit_code == 0, packaged.output
    configmap = next(
        doc
        for doc in yaml.safe_load_all((out / "k8s" / "configmap.yaml").read_text())
        if doc and doc["kind"] == "ConfigMap"
    )
    assert configmap["data"]["manifest.models-checkpoint.json"] == result.manifest_path.read_text()
    # Mounted at /etc/bisllm next to config.yaml: serve's default glob picks it up.
    etc = tmp_path / "etc-bisllm"
    etc.mkdir()
    for name, text in configmap["data"].items():
        (etc / name).write_text(text)
    assert [p.name for p in sorted(etc.glob("manifest.*.json"))] == [
        "manifest.models-checkpoint.json"
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.json").write_text('{"version": 1, "files": [{"path": "../etc/passwd"}]}')
    refused = CliRunner().invoke(
        main, ["package", str(example), "-o", str(tmp_path / "pkg2"), "--manifests", str(bad)]
    )
    assert refused.exit_code == 1 and "x.json" in refused.stderr


def test_hydration_is_counted_on_the_servers_metrics(tmp_path: Path):
    """What `bisllm serve` hydrated before loading shows on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from bisllm_bdn.hydrate import STATS
    from bisllm_server.openai.metrics import ServerMetrics

    def counters() -> dict[str, float]:
        body, _ = ServerMetrics("m").render()
        return {
            s.name: s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if s.name.startswith("bisllm_hydrat") and s.name.endswith("_total")
        }

    before = counters()
    assert before["bisllm_hydrate_bytes_fetched_total"] == STATS.snapshot()["bytes_fetched"]
    source = tmp_path / "src"
    source.mkdir()
    (source / "w.bin").write_bytes(b"x" * 1000)
    result = mirror_mount(
        Mount(source=f"file://{source}", mount_location="/m"), LocalStore(tmp_path / "o"), tmp_path
    )
    hydrate(result.manifest, tmp_path / "t", tmp_path / "c", progress=False)
    after = counters()
    assert (
        after["bisllm_hydrate_bytes_fetched_total"]
        == before["bisllm_hydrate_bytes_fetched_total"] + 1000
    )
    assert after["bisllm_hydrations_total"] == before["bisllm_hydrations_total"] + 1
