"""BDN hydrate throughput: shards hydrated from a LocalStore directory and from a local S3 server
(moto), against `cp -r`, plain boto3 and huggingface_hub downloads of the same bytes in the same
run; the warm-node start (cache full, hardlinks only); engine load time from the hydrated directory.

    .venv/bin/python benchmarks/bench_hydrate.py [--size-mb 2048] [--repeats 3] [--json out.json]
    .venv/bin/python benchmarks/bench_hydrate.py --quick      # smoke run: 256 MiB, 1 repeat
    .venv/bin/python benchmarks/bench_hydrate.py --workdir /mnt/scratch --keep

Data: --size-mb MiB of random bytes in --shards files, each a valid safetensors file holding one
uint8 tensor, in a scratch directory. Both origins are filled by `mirror_mount` from that
directory as a file:// source (mirror times are reported too): a LocalStore directory, and a
bucket on moto's S3 server, which runs in its own process so it never shares this process's GIL.

Paths, each --repeats times with a fresh node cache and target (medians in the report):

* hydrate from the LocalStore, cold cache; baselines `cp -r` of the source directory, and `cp -r`
  followed by `sync` of each copied file (hydrate fsyncs every blob before it names it, cp does
  not);
* warm-node start: hydrate into a new target with the cache from the run above (hardlinks only);
* hydrate from S3, cold cache; baselines boto3 `download_file` of every blob with the default
  TransferConfig, one file at a time and --workers files at a time (that client's connection
  pool is sized for it: --workers x 10 connections, so the pool does not throttle it);
* huggingface_hub baselines against the fake Hub of the tests (tests/bdn_servers.py `fake-hub`),
  which serves the source directory as one commit of a repo from its own process: a
  `hf_hub_download` of each shard in turn, and one `snapshot_download` with max_workers =
  --workers; files into a fresh `local_dir` (the target), with a fresh `cache_dir`. Shards are
  LFS files, so each HEAD on the hub answers a redirect to its CDN port, where the GET goes.

Engine load: a random-init Qwen3-MoE checkpoint in bf16 (about 1 GB; 22 MB with --quick) built with
transformers, mirrored to the LocalStore and hydrated; then `load_model` of the hydrated
directory vs the same checkpoint's source directory, and `safetensors.torch.load_file` of every
shard as a raw-read baseline.

The page cache is never dropped (that needs root): the source files, the store blobs and moto's
copy are all hot in memory when measured, the same for every path, so the figures are CPU and
memory-bandwidth bound, not disk bound. Writes land in the page cache as well, except what
hydrate and `cp + sync` flush; `os.sync()` runs (untimed) before every measurement, so dirty
pages of one path are never flushed on another's clock.

moto's stock S3 reads every object in full (twice) to answer any ranged GET, so a 16 MiB range of
a 512 MiB object costs two copies of 512 MiB, and hydrate and boto3 (both ranged) would measure
moto alone. By default the moto process caches each object's bytes, so a range costs a slice, as
on a real S3; --stock-moto runs moto unchanged. moto answers from one Python process either way:
the report gives the CPU cores it used, since it can still be the bottleneck.

The fake Hub is a Python stdlib server (http.server, a thread per connection, the file bytes sent
with sendfile) on loopback, not the Hub's servers and CDN: the absolute huggingface_hub figures
measure it too, and its CPU is reported like moto's. It hashes the shards once at start (untimed).
huggingface_hub runs with progress bars off, online (HF_HUB_OFFLINE unset) and over plain HTTP:
the fake Hub offers no Xet, and HF_HUB_ENABLE_HF_TRANSFER (set to 0) is a no-op in huggingface_hub
2.x, which has no hf_transfer.

Disk: about 4x --size-mb plus 3.3x the checkpoint's size, in the scratch directory (about 13 GB
for the defaults); the run refuses to start with less free. RAM: moto keeps the bucket's bytes in
memory (--size-mb), building the checkpoint takes about 3 GB (fp32 init, then bf16) and each load
about 1 GB, one at a time; the page cache should hold the scratch data too, so that every path
reads from memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import boto3
import psutil
import torch
from botocore.config import Config
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.utils import disable_progress_bars

from bisllm_bdn.hydrate import HydrateSummary, hydrate
from bisllm_bdn.manifest import Manifest
from bisllm_bdn.mirror import MirrorResult, mirror_mount
from bisllm_bdn.store import BlobStore, LocalStore, S3Store
from bisllm_server.engine.loader import load_model

MiB = 1 << 20
BUCKET = "bench-hydrate"
HF_REPO = "acme/shards"
FAKE_HUB = Path(__file__).resolve().parents[1] / "tests" / "bdn_servers.py"
DUMMY_KEY = "testing"  # moto accepts any key pair
MOUNT_LOCATION = "/models/bench"
BLOCK_BYTES = 64 * MiB  # random bytes written per call when generating shards
LOAD_REPEATS = 3  # the fewest repeats of the engine loads

# moto in its own process. Stock moto reads an object's whole buffer on every GET (FakeKey.value)
# and slices the range afterwards; this caches the bytes on the key (dropped when the key is
# written again), so a ranged GET costs a slice of the object instead of two copies of it.
MOTO_MAIN = """
import sys
from moto.server import main
if sys.argv[1] == "cached":
    import moto.s3.models as models
    stock = models.FakeKey.value
    def cached(self):
        data = self.__dict__.get("_bench_value")
        if data is None:
            data = self.__dict__["_bench_value"] = stock.fget(self)
        return data
    def store(self, new):
        self.__dict__.pop("_bench_value", None)
        stock.fset(self, new)
    models.FakeKey.value = property(cached, store)
main(sys.argv[2:])
"""


@dataclass(frozen=True)
class Mount:
    """The fields of a spec WeightsMount that mirroring reads."""

    source: str
    mount_location: str = MOUNT_LOCATION
    secret_name: str | None = None
    auth: dict[str, Any] | None = None
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None


# Qwen3-MoE shapes for the engine-load checkpoint: every layer sparse, untied embeddings.
FULL_MODEL = dict(
    vocab_size=32000,
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=512,
    intermediate_size=2048,
)
QUICK_MODEL = dict(
    vocab_size=8000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=256,
    intermediate_size=512,
)


def checkpoint_bytes(shape: dict[str, int]) -> int:
    """bf16 bytes of the checkpoint `build_checkpoint` writes for this shape."""
    hidden, heads, kv = (
        shape["hidden_size"],
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
    )
    head_dim, experts = shape["head_dim"], shape["num_experts"]
    attention = hidden * head_dim * (2 * heads + 2 * kv) + 2 * head_dim
    moe = experts * 3 * hidden * shape["moe_intermediate_size"] + experts * hidden
    layer = attention + moe + 2 * hidden
    params = 2 * shape["vocab_size"] * hidden + shape["num_hidden_layers"] * layer + hidden
    return 2 * params


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data -------------------------------------------------------------------------------------


def write_shard(path: Path, size: int) -> None:
    """A safetensors file of exactly `size` bytes: one uint8 tensor of random bytes."""

    def header(n: int) -> bytes:
        meta = {"blob": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}
        return json.dumps(meta, separators=(",", ":")).encode()

    # The header is padded to 8 bytes. The data is shorter than `size`, so its header is no
    # longer than the one sized for `size`: pad to that length and the data fills the rest.
    length = -(-len(header(size)) // 8) * 8
    data = size - 8 - length
    text = header(data).ljust(length)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        left = data
        while left:
            block = min(BLOCK_BYTES, left)
            out.write(os.urandom(block))
            left -= block


def write_shards(directory: Path, total: int, count: int) -> dict[str, int]:
    """`count` shards of `total` bytes in all; returns {relative path: size}."""
    directory.mkdir(parents=True)
    sizes = {}
    for i in range(count):
        size = total // count + (1 if i < total % count else 0)
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        write_shard(directory / name, size)
        sizes[name] = size
    return sizes


def build_checkpoint(directory: Path, shape: dict[str, int], shards: int) -> int:
    """A random-init Qwen3-MoE checkpoint in bf16, in about `shards` safetensors files; returns
    its tensor bytes."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar would interleave with the progress lines
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        **shape,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(directory, max_shard_size=-(-total // shards))
    del model
    gc.collect()
    return total


def tree_sizes(directory: Path) -> dict[str, int]:
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in directory.rglob("*")
        if p.is_file()
    }


def check_tree(directory: Path, expected: dict[str, int], what: str) -> None:
    """Every expected file is there with its size (content is checked by hydrate itself)."""
    got = tree_sizes(directory)
    wrong = {p: got.get(p) for p, size in expected.items() if got.get(p) != size}
    if wrong:
        raise RuntimeError(f"{what}: wrong or missing files in {directory}: {wrong}")


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


# -- moto -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_client(endpoint: str, pool: int = 10) -> Any:
    """A plain boto3 client (default config but for the connection pool's size)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=DUMMY_KEY,
        aws_secret_access_key=DUMMY_KEY,
        config=Config(max_pool_connections=pool),
    )


@contextlib.contextmanager
def moto_server(workdir: Path, *, stock: bool) -> Iterator[tuple[str, psutil.Process]]:
    """moto's S3 on a free loopback port in a child process; yields (endpoint, process). Its
    spilled object buffers go to `workdir`/moto-tmp, its log to `workdir`/moto.log."""
    port = free_port()
    tmp = workdir / "moto-tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    command = [sys.executable, "-c", MOTO_MAIN, "stock" if stock else "cached"]
    command += ["-H", "127.0.0.1", "-p", str(port)]
    moto_log = workdir / "moto.log"
    with moto_log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = s3_client(endpoint)
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                tail = moto_log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto exited with status {process.returncode}:\n{tail}")
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_store(endpoint: str) -> S3Store:
    secret = {"aws_access_key_id": DUMMY_KEY, "aws_secret_access_key": DUMMY_KEY}
    return S3Store(f"s3://{BUCKET}/bdn", credentials=secret, endpoint_url=endpoint)


# -- the fake Hub -----------------------------------------------------------------------------


def hf_environment() -> None:
    """huggingface_hub online, without progress bars or hf_transfer: in the environment, and in
    huggingface_hub's constants too, which it read from the environment on import."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_ENABLE_HF_TRANSFER"] = "0"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # either one means offline
        os.environ.pop(name, None)
    hf_constants.HF_HUB_OFFLINE = False
    disable_progress_bars()


@contextlib.contextmanager
def hub_server(workdir: Path, root: Path) -> Iterator[tuple[str, psutil.Process]]:
    """The fake Hub of the tests in a child process, serving `root` as the one commit of
    HF_REPO's main branch; yields (endpoint, process). Its log goes to `workdir`/hub.log."""
    command = [sys.executable, str(FAKE_HUB), "fake-hub", "--root", str(root), "--repo", HF_REPO]
    hub_log = workdir / "hub.log"
    with hub_log.open("wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert process.stdout is not None
        endpoint = process.stdout.readline().strip()  # printed once the files are hashed
        if not endpoint:
            process.wait()
            tail = hub_log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the fake hub exited with status {process.returncode}:\n{tail}")
        yield endpoint, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Run:
    """One path, one repeat."""

    path: str
    repeat: int
    seconds: float
    bytes: int
    client_cpu: float  # CPU seconds of this process (threads summed) or of the child (cp)
    server_cpu: float = 0.0  # CPU seconds of the moto process; 0 for local paths
    extra: dict[str, Any] = field(default_factory=dict)


class Clock:
    """Wall time and CPU seconds of this process, its children and the moto process."""

    def __init__(self, server: psutil.Process | None = None) -> None:
        self.server = server
        os.sync()  # earlier paths' dirty pages are flushed before the clock starts
        self.cpu = self._cpu()
        self.start = time.perf_counter()

    def _cpu(self) -> tuple[float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        server = 0.0
        if self.server is not None:
            times = self.server.cpu_times()
            server = times.user + times.system
        return time.process_time(), children.ru_utime + children.ru_stime, server

    def stop(self, path: str, repeat: int, nbytes: int, **extra: Any) -> Run:
        seconds = time.perf_counter() - self.start
        own, children, server = (b - a for a, b in zip(self.cpu, self._cpu(), strict=True))
        return Run(path, repeat, seconds, nbytes, own + children, server, extra)


def run_hydrate(
    path: str,
    repeat: int,
    manifest: Manifest,
    target: Path,
    cache: Path,
    open_store: Callable[[], BlobStore] | None,
    args: argparse.Namespace,
    server: psutil.Process | None = None,
) -> tuple[Run, HydrateSummary]:
    """One hydrate call, the store opened inside the timed region (a node's real start)."""
    clock = Clock(server)
    store = open_store() if open_store else None
    try:
        summary = hydrate(
            manifest,
            target,
            cache,
            store=store,
            workers=args.workers,
            chunk_bytes=args.chunk_mb * MiB,
            progress=False,
        )
    finally:
        if store is not None:
            store.close()
    run = clock.stop(path, repeat, manifest.total_bytes, summary=asdict(summary))
    return run, summary


def run_cp(path: str, repeat: int, source: Path, target: Path, nbytes: int, *, sync: bool) -> Run:
    clock = Clock()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    if sync:
        files = [str(p) for p in target.rglob("*") if p.is_file()]
        subprocess.run(["sync", *files], check=True)
    return clock.stop(path, repeat, nbytes)


def run_boto3(
    path: str,
    repeat: int,
    endpoint: str,
    keys: dict[str, str],
    target: Path,
    nbytes: int,
    workers: int,
    server: psutil.Process,
) -> Run:
    """download_file of every {relative path: key}, `workers` files at a time, default
    TransferConfig; the client is made inside the timed region, as hydrate's store is."""
    clock = Clock(server)
    # download_file runs up to 10 (TransferConfig's default) ranged GETs per file.
    client = s3_client(endpoint, pool=10 * workers)

    def download(item: tuple[str, str]) -> None:
        rel, key = item
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(dest))

    if workers == 1:
        for item in keys.items():
            download(item)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(download, keys.items()))
    client.close()
    return clock.stop(path, repeat, nbytes)


def run_hf(
    path: str,
    repeat: int,
    endpoint: str,
    names: list[str],
    target: Path,
    cache: Path,
    nbytes: int,
    workers: int,
    server: psutil.Process,
) -> Run:
    """huggingface_hub from the fake Hub at `endpoint`, files into `target` (local_dir), `cache`
    as cache_dir: `hf_hub_download` of each of `names` in turn when `workers` is 1, else one
    `snapshot_download` with max_workers=`workers`. Both resolve the branch, as a user would."""
    clock = Clock(server)
    where = dict(endpoint=endpoint, cache_dir=cache, local_dir=target, token=False)
    if workers == 1:
        for name in names:
            hf_hub_download(HF_REPO, name, revision="main", **where)
    else:
        snapshot_download(HF_REPO, revision="main", max_workers=workers, **where)
    return clock.stop(path, repeat, nbytes)


def sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_engine_load(path: str, repeat: int, directory: Path, device: str) -> Run:
    clock = Clock()
    loaded = load_model(directory, device=device)
    sync_device(device)
    run = clock.stop(
        path, repeat, loaded.bytes_read, load_seconds=loaded.load_seconds, device=device
    )
    del loaded
    gc.collect()
    return run


def run_raw_load(path: str, repeat: int, directory: Path, device: str) -> Run:
    from safetensors.torch import load_file

    clock = Clock()
    nbytes = 0
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(shard, device=device)
        nbytes += sum(t.nbytes for t in tensors.values())
        del tensors
    sync_device(device)
    run = clock.stop(path, repeat, nbytes, load_seconds=None, device=device)
    gc.collect()
    return run


# -- report -----------------------------------------------------------------------------------


def median_seconds(runs: list[Run], path: str) -> float:
    return statistics.median(r.seconds for r in runs if r.path == path)


def median_of(runs: list[Run], path: str, key: Callable[[Run], float]) -> float:
    return statistics.median(key(r) for r in runs if r.path == path)


def cores(runs: list[Run], path: str) -> str:
    client = median_of(runs, path, lambda r: r.client_cpu / r.seconds)
    if not any(r.server_cpu for r in runs if r.path == path):
        return f"{client:.2f}"
    server = median_of(runs, path, lambda r: r.server_cpu / r.seconds)
    name = "hub" if path.startswith("hf-") else "moto"
    return f"{client:.2f} + {name} {server:.2f}"


def speed(baseline: float, seconds: float) -> str:
    """How many times faster than the baseline (baseline seconds / path seconds)."""
    return f"{baseline / seconds:.2f}x"


def machine_facts(scratch: Path) -> dict[str, Any]:
    fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(scratch)], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM",
        "cpu": platform.processor() or platform.machine(),
        "scratch": str(scratch),
        "filesystem": fs or "unknown",
        "python": platform.python_version(),
        "versions": {
            name: version(name)
            for name in (
                "torch",
                "transformers",
                "boto3",
                "moto",
                "huggingface_hub",
                "safetensors",
            )
        },
    }


def command_python() -> str:
    """The interpreter as typed from the repository (.venv/bin/python), else its full path."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def transfer_table(runs: list[Run], total: int, parallel: int, workers: int) -> list[str]:
    """`parallel`: files the parallel boto3 baseline had in flight (--workers, at most the shards);
    `workers`: snapshot_download's max_workers (--workers)."""

    def row(name: str, path: str, versus: str) -> str:
        seconds = median_seconds(runs, path)
        return (
            f"| {name} | {seconds:.3f} | {total / 1e6 / seconds:,.0f} | {cores(runs, path)} "
            f"| {versus} |"
        )

    cp = median_seconds(runs, "cp")
    cp_sync = median_seconds(runs, "cp+sync")
    local = median_seconds(runs, "hydrate-local")
    s3 = median_seconds(runs, "hydrate-s3")
    seq = median_seconds(runs, "boto3-sequential")
    par = median_seconds(runs, "boto3-parallel")
    hf_seq = median_seconds(runs, "hf-sequential")
    hf_snap = median_seconds(runs, "hf-snapshot")
    warm = median_seconds(runs, "warm-node")

    def versus_hf(seconds: float) -> str:
        return (
            f"{speed(hf_seq, seconds)} `hf_hub_download` one at a time, "
            f"{speed(hf_snap, seconds)} `snapshot_download`"
        )

    lines = [
        "| path | seconds | MB/s | CPU cores | speed vs baseline |",
        "|---|---:|---:|---:|---|",
        row(
            "hydrate ← LocalStore, cold cache",
            "hydrate-local",
            f"{speed(cp, local)} `cp -r`, {speed(cp_sync, local)} `cp -r` + sync; "
            f"{versus_hf(local)}",
        ),
        row("`cp -r` (baseline)", "cp", "1.00x"),
        row("`cp -r` + `sync` each file (baseline)", "cp+sync", "1.00x"),
        row(
            "hydrate ← S3 (moto), cold cache",
            "hydrate-s3",
            f"{speed(seq, s3)} boto3 one at a time, {speed(par, s3)} boto3 {parallel} at a time; "
            f"{versus_hf(s3)}",
        ),
        row("boto3 `download_file`, one file at a time (baseline)", "boto3-sequential", "1.00x"),
        row(
            f"boto3 `download_file`, {parallel} files at a time (baseline)",
            "boto3-parallel",
            "1.00x",
        ),
        row(
            "huggingface_hub `hf_hub_download`, one file at a time, fake Hub (baseline)",
            "hf-sequential",
            "1.00x",
        ),
        row(
            f"huggingface_hub `snapshot_download` (max_workers = {workers}), fake Hub (baseline)",
            "hf-snapshot",
            "1.00x",
        ),
        f"| warm node: hydrate, cache full (hardlinks only) | {warm:.4f} | – "
        f"| {cores(runs, 'warm-node')} | {speed(cp, warm)} `cp -r` |",
    ]
    return [*lines, ""]


def load_table(runs: list[Run]) -> list[str]:
    source = median_seconds(runs, "load-source")
    lines = [
        "| load | wall seconds | load_seconds (engine) | GB/s (wall) | vs source dir |",
        "|---|---:|---:|---:|---|",
    ]
    rows = (
        ("`load_model`, hydrated dir", "load-hydrated"),
        ("`load_model`, source dir (baseline)", "load-source"),
        ("`safetensors.torch.load_file`, every shard (raw read)", "load-raw"),
    )
    for name, path in rows:
        seconds = median_seconds(runs, path)
        nbytes = median_of(runs, path, lambda r: r.bytes)
        engine = "–"
        if path != "load-raw":
            engine = f"{median_of(runs, path, lambda r: r.extra['load_seconds']):.3f}"
        lines.append(
            f"| {name} | {seconds:.3f} | {engine} | {nbytes / 1e9 / seconds:.2f} "
            f"| {speed(source, seconds)} |"
        )
    return [*lines, ""]


def once_line(name: str, result: MirrorResult) -> str:
    return (
        f"  - {name}: {result.seconds:.2f} s, {result.bytes_total / 1e6 / result.seconds:,.0f} "
        f"MB/s ({result.files} files, {result.bytes_sent / 1e6:,.0f} MB sent)"
    )


# -- main -------------------------------------------------------------------------------------


def disk_needed(total: int, shard: int, model: int) -> int:
    """Peak scratch bytes: source, LocalStore and moto's buffers (3x), one measurement's output
    (1x), mirror temporaries (a shard, and a shard's multipart parts in moto); the checkpoint's
    source, store blobs and node cache (hydrated trees are hardlinks), plus its mirror temporary."""
    return 4 * total + 2 * shard + model * 13 // 4 + 256 * MiB


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=2048, help="Shard bytes in all, MiB.")
    parser.add_argument("--shards", type=int, default=4, help="Files the shard bytes split into.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="hydrate's workers (default 8).")
    parser.add_argument(
        "--chunk-mb", type=int, default=16, help="hydrate's range size in MiB (default 16)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="Smoke run: 256 MiB, 1 repeat, a 22 MB model."
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="Where the scratch directory is made (default: the system temp directory).",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the scratch directory.")
    parser.add_argument(
        "--stock-moto",
        action="store_true",
        help="Run moto unchanged (every ranged GET copies the whole object twice).",
    )
    parser.add_argument("--device", default="cpu", help="Device for the engine loads (cpu, cuda).")
    parser.add_argument("--json", type=Path, help="Also write the raw numbers here.")
    args = parser.parse_args()
    if args.quick:
        args.size_mb, args.repeats = 256, 1
    return args


def main() -> None:
    args = parse_args()
    shape = QUICK_MODEL if args.quick else FULL_MODEL
    total = args.size_mb * MiB
    shard = -(-total // args.shards)
    model_estimate = checkpoint_bytes(shape)
    parent = args.workdir or Path(tempfile.gettempdir())
    needed = disk_needed(total, shard, model_estimate)
    free = shutil.disk_usage(parent).free
    if free < needed:
        sys.exit(
            f"{parent} has {free / 1e9:.1f} GB free; this run needs about {needed / 1e9:.1f} GB "
            "(4x --size-mb plus 3.3x the checkpoint); pick another --workdir or a smaller --size-mb"
        )
    scratch = Path(tempfile.mkdtemp(prefix="bench-hydrate-", dir=parent))
    log(f"scratch directory {scratch} ({free / 1e9:.1f} GB free, about {needed / 1e9:.1f} needed)")
    try:
        results = benchmark(args, scratch, shape, total)
    finally:
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def benchmark(
    args: argparse.Namespace, scratch: Path, shape: dict[str, int], total: int
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "command": shlex.join([command_python(), *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **machine_facts(scratch),
        "size_bytes": total,
        "shards": args.shards,
        "repeats": args.repeats,
        "workers": args.workers,
        "chunk_bytes": args.chunk_mb * MiB,
        "moto": "stock" if args.stock_moto else "cached object bytes",
        "hub": "tests/bdn_servers.py fake-hub (stdlib http.server on loopback, own process)",
        "model_shape": shape,
    }
    source = scratch / "source"
    log(f"writing {args.shards} shards, {total / MiB:,.0f} MiB of random bytes, to {source}")
    start = time.perf_counter()
    sizes = write_shards(source, total, args.shards)
    log(f"  {time.perf_counter() - start:.1f} s")

    runs: list[Run] = []
    hf_environment()
    log("starting moto, and the fake hub (it hashes the shards first)")
    start = time.perf_counter()
    with (
        moto_server(scratch, stock=args.stock_moto) as (endpoint, server),
        hub_server(scratch, source) as (hub, hub_process),
    ):
        log(f"  {time.perf_counter() - start:.1f} s")
        log(f"moto S3 at {endpoint} (pid {server.pid}), fake hub at {hub} (pid {hub_process.pid})")
        mount = Mount(source=source.as_uri())
        local_store = LocalStore(scratch / "store")
        log("mirror file:// → LocalStore")
        mirror_local = mirror_mount(mount, local_store, scratch / "manifests-local")
        log(f"  {mirror_local.seconds:.2f} s")
        log("mirror file:// → S3 (moto)")
        remote = s3_store(endpoint)
        mirror_s3 = mirror_mount(mount, remote, scratch / "manifests-s3", work_dir=scratch)
        keys = {f.path: remote.key(f.sha256) for f in mirror_s3.manifest.files}
        remote.close()
        log(f"  {mirror_s3.seconds:.2f} s")
        results["mirror"] = {
            "local": mirror_local.to_dict(),
            "s3": mirror_s3.to_dict(),
        }
        runs += measure_transfers(
            args,
            scratch,
            source,
            sizes,
            mirror_local,
            mirror_s3,
            keys,
            (endpoint, server),
            (hub, hub_process),
        )

    log(
        f"engine load: building a Qwen3-MoE checkpoint (about {checkpoint_bytes(shape) / 1e6:,.0f} MB)"
    )
    model_runs, model_info = measure_loads(args, scratch, shape)
    runs += model_runs
    results["model"] = model_info

    lines = report(args, results, runs, total, mirror_local, mirror_s3, model_info)
    print("\n".join(lines))
    results["runs"] = [asdict(r) for r in runs]
    return results


def measure_transfers(
    args: argparse.Namespace,
    scratch: Path,
    source: Path,
    sizes: dict[str, int],
    mirror_local: MirrorResult,
    mirror_s3: MirrorResult,
    keys: dict[str, str],
    s3: tuple[str, psutil.Process],
    hub: tuple[str, psutil.Process],
) -> list[Run]:
    """Every transfer path, --repeats times; `s3` and `hub` are (endpoint, server process)."""
    endpoint, server = s3
    hub_endpoint, hub_process = hub
    total = sum(sizes.values())
    local_manifest, s3_manifest = mirror_local.manifest, mirror_s3.manifest
    store_root = scratch / "store"
    cache, target, warm_target = scratch / "cache", scratch / "target", scratch / "warm-target"
    hf_cache = scratch / "hf-cache"
    runs: list[Run] = []

    def record(run: Run) -> None:
        runs.append(run)
        log(
            f"  {run.path:>16} repeat {run.repeat + 1}/{args.repeats}: {run.seconds:8.3f} s  "
            f"{run.bytes / 1e6 / run.seconds:9,.0f} MB/s"
        )

    # Repeats outermost, so slow drift of the machine spreads over all paths alike.
    for repeat in range(args.repeats):
        run, summary = run_hydrate(
            "hydrate-local",
            repeat,
            local_manifest,
            target,
            cache,
            lambda: LocalStore(store_root),
            args,
        )
        check_tree(target, sizes, "hydrate-local")
        assert summary.bytes_fetched == total, summary
        record(run)

        # The cache is full now: a new target gets hardlinks only, and the origin is not opened.
        run, summary = run_hydrate(
            "warm-node", repeat, local_manifest, warm_target, cache, None, args
        )
        check_tree(warm_target, sizes, "warm-node")
        assert summary.bytes_fetched == 0 and summary.blobs_fetched == 0, summary
        record(run)
        for path in (cache, target, warm_target):
            remove(path)

        for name, sync in (("cp", False), ("cp+sync", True)):
            record(run_cp(name, repeat, source, target, total, sync=sync))
            check_tree(target, sizes, name)
            remove(target)

        run, summary = run_hydrate(
            "hydrate-s3",
            repeat,
            s3_manifest,
            target,
            cache,
            lambda: s3_store(endpoint),
            args,
            server,
        )
        check_tree(target, sizes, "hydrate-s3")
        assert summary.bytes_fetched == total, summary
        record(run)
        remove(cache)
        remove(target)

        for name, workers in (("boto3-sequential", 1), ("boto3-parallel", args.workers)):
            record(run_boto3(name, repeat, endpoint, keys, target, total, workers, server))
            check_tree(target, sizes, name)
            remove(target)

        for name, workers in (("hf-sequential", 1), ("hf-snapshot", args.workers)):
            record(
                run_hf(
                    name,
                    repeat,
                    hub_endpoint,
                    sorted(sizes),
                    target,
                    hf_cache,
                    total,
                    workers,
                    hub_process,
                )
            )
            check_tree(target, sizes, name)
            remove(target)
            remove(hf_cache)
    return runs


def measure_loads(
    args: argparse.Namespace, scratch: Path, shape: dict[str, int]
) -> tuple[list[Run], dict[str, Any]]:
    model_source = scratch / "model-source"
    start = time.perf_counter()
    tensor_bytes = build_checkpoint(model_source, shape, shards=4)
    built = time.perf_counter() - start
    files = tree_sizes(model_source)
    log(f"  built in {built:.1f} s: {len(files)} files, {sum(files.values()) / 1e6:,.0f} MB")

    store = LocalStore(scratch / "store")
    mount = Mount(source=model_source.as_uri(), mount_location="/models/checkpoint")
    mirrored = mirror_mount(mount, store, scratch / "manifests-model")
    hydrated = scratch / "model-hydrated"
    os.sync()
    summary = hydrate(mirrored.manifest, hydrated, scratch / "model-cache", progress=False)
    check_tree(hydrated, files, "model hydrate")
    log(f"  mirrored in {mirrored.seconds:.2f} s, hydrated in {summary.seconds:.2f} s")
    info = {
        "tensor_bytes": tensor_bytes,
        "files": len(files),
        "file_bytes": sum(files.values()),
        "shards": sum(1 for f in files if f.endswith(".safetensors")),
        "build_seconds": built,
        "mirror": mirrored.to_dict(),
        "hydrate": asdict(summary),
    }

    # Untimed loads of both directories first: the first few loads of a process pay one-time
    # costs (imports, allocator growth, first page faults) that belong to no path.
    for directory in (model_source, hydrated):
        run_engine_load("warm-up", 0, directory, args.device)
    runs: list[Run] = []
    # Loads are short, so at least 3 repeats even in a smoke run: one load is noisy.
    repeats = max(args.repeats, LOAD_REPEATS)
    info["repeats"] = repeats
    for repeat in range(repeats):
        for path, directory in (("load-hydrated", hydrated), ("load-source", model_source)):
            runs.append(run_engine_load(path, repeat, directory, args.device))
        runs.append(run_raw_load("load-raw", repeat, model_source, args.device))
        for run in runs[-3:]:
            log(
                f"  {run.path:>16} repeat {repeat + 1}/{repeats}: {run.seconds:8.3f} s  "
                f"{run.bytes / 1e9 / run.seconds:6.2f} GB/s"
            )
    return runs, info


def report(
    args: argparse.Namespace,
    results: dict[str, Any],
    runs: list[Run],
    total: int,
    mirror_local: MirrorResult,
    mirror_s3: MirrorResult,
    model: dict[str, Any],
) -> list[str]:
    moto = "stock" if args.stock_moto else "object bytes cached, so a ranged GET costs a slice"
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    shape = results["model_shape"]
    model_hydrate = model["hydrate"]
    lines = [
        "## BDN hydrate vs `cp`, plain boto3 and huggingface_hub",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}",
        f"- machine: {results['machine']}; scratch on {results['filesystem']}; "
        f"Python {results['python']}, {versions}",
        f"- data: {args.shards} safetensors shards of random bytes, {total / MiB:,.0f} MiB in all; "
        f"hydrate with {args.workers} workers, {args.chunk_mb} MiB ranges; moto in its own process "
        f"({moto}); medians of {args.repeats} repeat(s), fresh node cache and target each time",
        "- fake Hub: the tests' `tests/bdn_servers.py fake-hub` in its own process, serving the "
        "source directory as one commit: a Python stdlib server (http.server, a thread per "
        "connection, file bytes sent with sendfile) on loopback, not the Hub and its CDN, so the "
        "absolute huggingface_hub figures measure this server too. Every shard is an LFS file: "
        "a HEAD answered with a redirect to the fake CDN's port, then a GET there. "
        "huggingface_hub over plain HTTP (no Xet here), progress bars off; files into the target "
        "as `local_dir`, a fresh `cache_dir` each time",
        "- page cache: not dropped; sources, store blobs and moto's copy are hot in memory for "
        "every path, so this measures CPU and memory bandwidth, not disks. hydrate and "
        "`cp -r` + `sync` flush what they write; `cp -r`, boto3 and huggingface_hub leave it "
        "dirty in memory",
        "- speed vs baseline = baseline seconds / path seconds (above 1: faster than the baseline); "
        "CPU cores = CPU seconds / wall seconds (this process or cp, + the server process: moto "
        "or the fake hub)",
        "",
        f"### Shards: {total / MiB:,.0f} MiB",
        "",
        *transfer_table(runs, total, min(args.workers, args.shards), args.workers),
        "Once, to fill the origins (not repeated):",
        "",
        once_line("mirror file:// → LocalStore", mirror_local),
        once_line("mirror file:// → S3 (moto)", mirror_s3),
        "",
        f"### Engine load: Qwen3-MoE, bf16, {model['tensor_bytes'] / 1e6:,.0f} MB of tensors "
        f"in {model['shards']} shards",
        "",
        f"- shape: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_experts']} experts of {shape['moe_intermediate_size']}, "
        f"vocab {shape['vocab_size']}; random init, built in {model['build_seconds']:.1f} s; "
        f"loaded on {args.device}",
        f"- mirror to the LocalStore {model['mirror']['seconds']:.2f} s; hydrate, cold cache, "
        f"{model_hydrate['seconds']:.2f} s ({model_hydrate['throughput_mb_s']:,.0f} MB/s)",
        "- the hydrated files are hardlinks to the node cache's blobs: the same kind of file as "
        "the source, so a ratio near 1.00x is expected; two untimed loads first, medians of "
        f"{model['repeats']} repeats",
        "",
        *load_table(runs),
    ]
    return lines


if __name__ == "__main__":
    main()
