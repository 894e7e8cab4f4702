"""Disaggregated prefill/decode against aggregated serving with the same worker count.

In one run: inter-token latency of short streams while long prompts arrive, in both modes, and
the K/V handoffs' throughput against the raw bandwidth of their transport.

    .venv/bin/python benchmarks/bench_disagg.py [--repeats 3] [--window 36] [--json FILE]
    .venv/bin/python benchmarks/bench_disagg.py --quick       # smoke run: 1 repeat, 12 s window

Modes, alternated repeat by repeat (aggregated, disaggregated, aggregated, ...) so that drift of
a shared machine hits both alike; each repeat starts a fresh `bisllm serve` of the embedded model
(examples/bisllm-tiny-moe), with OMP_NUM_THREADS=1 so each worker keeps to one core:
- aggregated: `--workers 2`, two workers that prefill and decode behind the KV-aware router;
- disaggregated: `--disaggregated`, one prefill and one decode worker (1P:1D) behind it, with
  `--max-local-prefill-tokens 256`: the short prompts are prefilled on the decode worker, the
  long ones on the prefill worker, whose K/V the decode worker pulls over HTTP.

Load in each repeat (seeded; the same prompts in the same order in both modes), all streamed
from `/v1/completions`, greedy, `ignore_eos`, for `--window` seconds:
- `--clients` short clients, each sending its next request as soon as the previous one ends:
  prompts of ~30 tokens of varied text, 64 output tokens;
- a long prompt (1,500-1,800 tokens of varied text, each with its own start so no prefix cache
  helps it, 1 output token) every `--interval` seconds.

Metrics, as the client sees them:
- ITL: the gaps between consecutive SSE chunks that carry text, after a short request's first;
  all gaps of a repeat pooled, p50/p90/p99/p99.9/max and the gaps over 100 ms. TTFT p50 of the
  short and of the long requests, the short requests' end-to-end p99 and output tokens/s.
  Per mode, the median of each figure over repeats, and disaggregated / aggregated ratios.
- Transfer: the decode worker's `bisllm_kv_*` counters over the disaggregated windows: handoff
  bytes / seconds spent receiving them (first body byte to last, the metric's definition), mean
  handoff size and remote-prefill time, failures and fallbacks to local prefill.
- Raw bandwidth, measured afterwards on the same machine with the serving processes stopped,
  for a body the size of the mean handoff: a plain TCP loopback socket pair, and HTTP over
  loopback (uvicorn + FastAPI answering an octet-stream body, read with httpx as the decode
  worker reads a handoff); medians of `--bandwidth-repeats`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "bisllm-tiny-moe" / "config.yaml"
CHECKPOINT = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
MODES = ("aggregated", "disaggregated")
WORKERS = 2  # in both modes: two aggregated workers, or one prefill and one decode worker
SHORT_TOKENS = (26, 34)  # prompt length range of a short request
SHORT_OUTPUT = 64
LONG_TOKENS = (1500, 1800)  # under the model's 2,048-token context, with room for the output
# Between the two prompt lengths: short prompts stay on their decode worker, long ones go remote.
MAX_LOCAL_PREFILL = 256
MB = 1e6  # figures are in decimal megabytes per second

# Plain words for prompts; random sentences of them differ from request to request.
WORD_LIST = (
    "river stone cloud maple lantern orbit velvet harbor copper garden window engine letter "
    "market silver winter morning bridge candle forest island machine number paper pocket "
    "rabbit season signal station summer thunder ticket valley village wagon whistle yellow "
    "answer basket butter castle circle doctor family father finger flower friend "
    "guitar hammer honey hunter jacket kitchen ladder mirror monkey mother needle orange "
    "pencil picture planet rocket saddle school shadow sister spider square sugar teacher "
    "tiger tomato travel turtle button carpet cousin dinner farmer glass"
)
WORDS = WORD_LIST.split()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- workload -------------------------------------------------------------------------------


@dataclass
class Workload:
    short: list[list[str]]  # per client, its prompts in the order it sends them
    long: list[str]  # in arrival order


def sentences(rng: random.Random, words: int) -> str:
    out = []
    while words > 0:
        n = min(words, rng.randint(6, 14))
        sentence = " ".join(rng.choice(WORDS) for _ in range(n))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ",", "?", ";")))
        words -= n
    return " ".join(out)


def sized_text(tokenizer: Any, rng: random.Random, lead: str, tokens: int) -> str:
    """`lead` and random sentences, cut to about `tokens` tokens. The cut is made on token ids
    and decoded back, so the server's count may differ from `tokens` by a token or two."""
    text = lead + " " + sentences(rng, tokens)  # a word is at least one token, so this is enough
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def make_workload(
    tokenizer: Any, seed: int, clients: int, window: float, interval: float
) -> Workload:
    rng = random.Random(seed)
    # A short request takes at least 64 decode steps (tens of ms each here), so a client never
    # gets through more than one every 0.1 s; running out of prompts is reported, not wrapped.
    per_client = int(window / 0.1) + 16
    short = [
        [
            sized_text(
                tokenizer,
                rng,
                f"Question {c}.{k}: in one paragraph, tell me about",
                rng.randint(*SHORT_TOKENS),
            )
            for k in range(per_client)
        ]
        for c in range(clients)
    ]
    # Each long prompt opens with its own number and words: its first page is like no other's.
    long = [
        sized_text(tokenizer, rng, f"Document {seed}-{k}. Summarise it.", rng.randint(*LONG_TOKENS))
        for k in range(math.ceil(window / interval) + 1)
    ]
    return Workload(short, long)


# -- one streamed request -------------------------------------------------------------------


@dataclass
class Stream:
    """One request as the client saw it."""

    kind: str  # "short" or "long"
    sent_s: float  # when it was sent, from the window's start
    ttft_s: float | None = None  # until the first chunk carrying text
    e2e_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)  # between text chunks, after the first
    prompt_tokens: int = 0
    completion_tokens: int = 0
    worker: str = ""  # x-bisllm-worker: the (decode) worker that answered
    prefill_worker: str = ""  # x-bisllm-prefill-worker: "local", an address, "" if aggregated
    error: str | None = None


async def stream_completion(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, kind: str, opened: float
) -> Stream:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    s = Stream(kind, start - opened)
    last: float | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            s.worker = response.headers.get("x-bisllm-worker", "")
            s.prefill_worker = response.headers.get("x-bisllm-prefill-worker", "")
            if response.status_code != 200:
                s.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                return s
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk.get("error"):
                    s.error = str(chunk["error"])[:200]
                if chunk.get("usage"):
                    s.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    s.completion_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                # A chunk without text (a held-back partial character, the usage chunk) is no
                # token the user sees, so it neither starts nor splits a gap.
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        s.ttft_s = now - start
                    else:
                        s.gaps_s.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        s.error = repr(exc)[:200]
    s.e2e_s = time.perf_counter() - start
    if s.error is None and s.completion_tokens != max_tokens:
        s.error = f"{s.completion_tokens} tokens, expected {max_tokens}"
    return s


async def run_load(url: str, model: str, workload: Workload, args: argparse.Namespace) -> Any:
    """The short clients and the long arrivals for one window; returns (streams, seconds from
    the window's start until the last request ended, whether a client ran out of prompts)."""
    timeout = httpx.Timeout(300, connect=10)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    streams: list[Stream] = []
    exhausted = False
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        opened = time.perf_counter()
        deadline = opened + args.window

        async def short_client(index: int, prompts: list[str]) -> None:
            nonlocal exhausted
            # Staggered starts, so the clients' requests do not begin and end in lockstep.
            await asyncio.sleep(index * 0.25)
            for prompt in prompts:
                if time.perf_counter() >= deadline:
                    return
                streams.append(
                    await stream_completion(client, model, prompt, SHORT_OUTPUT, "short", opened)
                )
            exhausted = True

        async def long_arrivals() -> None:
            tasks = []
            for k, prompt in enumerate(workload.long):
                at = opened + args.interval / 2 + k * args.interval
                if at >= deadline:
                    break
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                # Not awaited one by one: arrivals keep their schedule whatever the server does.
                tasks.append(
                    asyncio.create_task(stream_completion(client, model, prompt, 1, "long", opened))
                )
            streams.extend(await asyncio.gather(*tasks))

        await asyncio.gather(
            *(short_client(i, p) for i, p in enumerate(workload.short)), long_arrivals()
        )
        return streams, time.perf_counter() - opened, exhausted


# -- serving processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_configs(tmp: Path) -> dict[str, Path]:
    """The embedded model's config, with its checkpoint made absolute; the disaggregated one
    adds only the 1P:1D unit, so everything else is the same in both modes."""
    base = yaml.safe_load(CONFIG.read_text())
    base["trt_llm"]["build"]["checkpoint_repository"]["repo"] = str(CHECKPOINT)
    disagg = {
        **base,
        "llm_config": {
            "is_disaggregated": True,
            "b10_disagg_config": {
                "prefill_workers_per_replica": 1,
                "decode_workers_per_replica": 1,
            },
        },
    }
    paths = {"aggregated": tmp / "aggregated.yaml", "disaggregated": tmp / "disaggregated.yaml"}
    paths["aggregated"].write_text(yaml.safe_dump(base))
    paths["disaggregated"].write_text(yaml.safe_dump(disagg))
    return paths


def stop_process(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not exited in `timeout` s; the same for any child it
    leaves behind (a killed router cannot stop its workers)."""
    if process.poll() is not None:
        return
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        progress(f"  pid {process.pid} did not stop in {timeout:.0f} s: killing it")
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        progress(f"  child pid {child.pid} outlived its parent: killing it")
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def serving(mode: str, config: Path, log: Path, args: argparse.Namespace) -> Iterator[str]:
    """`bisllm serve` in `mode` on a free port, until WORKERS workers are ready; yields its
    URL. Its own session, so a Ctrl-C reaches this script only, which then stops it."""
    port = free_port()
    command = [sys.executable, "-m", "bisllm_truss.cli", "serve", str(config)]
    if mode == "disaggregated":
        command += ["--disaggregated", "--max-local-prefill-tokens", str(MAX_LOCAL_PREFILL)]
    else:
        command += ["--workers", str(WORKERS)]
    command += ["--dtype", args.dtype, "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log, args.startup_timeout)
        yield url
    finally:
        stop_process(process)


def router_workers(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/router/workers", timeout=5).json()["workers"]


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"bisllm serve exited with {process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            workers = router_workers(url)
            if sum(w["status"] == "ready" for w in workers) == WORKERS:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{WORKERS} workers were not ready after {timeout:.0f} s; see {log}")


def scrape(address: str) -> dict[str, float]:
    """A worker's bisllm_kv_* counters and histogram sums/counts, by sample name (and any
    label other than the model: a failure's or fallback's reason)."""
    body = httpx.get(f"http://{address}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            name = sample.name
            # Counters and histogram sums/counts only: a gauge's difference means nothing.
            if not name.startswith("bisllm_kv_") or not name.endswith(("_total", "_sum", "_count")):
                continue
            labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
            key = name + "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items()))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def log_problems(log: Path) -> list[str]:
    """Warning and error lines of a serve log (it runs at --log-level warning, so anything
    there is worth a look)."""
    lines = log.read_text(errors="replace").splitlines()
    keys = ("warning", "error", "traceback", "exception", "killed")
    return [line for line in lines if any(k in line.lower() for k in keys)]


# -- one repeat of one mode -----------------------------------------------------------------


@dataclass
class Run:
    mode: str
    repeat: int
    elapsed_s: float
    streams: list[Stream]
    workers: list[dict[str, Any]]  # address and role of each worker
    kv: dict[str, dict[str, float]]  # per worker address: bisllm_kv_* over the window
    exhausted: bool
    log: str
    log_problems: list[str]

    def summary(self) -> dict[str, float]:
        short = [s for s in self.streams if s.kind == "short" and s.error is None]
        long = [s for s in self.streams if s.kind == "long" and s.error is None]
        gaps = [g for s in short for g in s.gaps_s]
        nan = float("nan")
        # Over the short clients' own span: the window plus their last request, not the tail
        # of long prompts still in flight.
        span = max((s.sent_s + s.e2e_s for s in short), default=self.elapsed_s)
        return {
            "itl_p50_ms": percentile(gaps, 50) * 1e3 if gaps else nan,
            "itl_p90_ms": percentile(gaps, 90) * 1e3 if gaps else nan,
            "itl_p99_ms": percentile(gaps, 99) * 1e3 if gaps else nan,
            # Beyond the p99 asked for: a long prefill stalls a handful of streams for one
            # gap each, fewer than 1 gap in 100, so p99.9, the max and a count show it.
            "itl_p999_ms": percentile(gaps, 99.9) * 1e3 if gaps else nan,
            "itl_max_ms": max(gaps) * 1e3 if gaps else nan,
            "gaps_over_100ms": sum(g > 0.1 for g in gaps),
            "short_ttft_p50_ms": ms_p50([s.ttft_s for s in short]),
            "long_ttft_p50_ms": ms_p50([s.ttft_s for s in long]),
            "long_ttft_p90_ms": ms_p(90, [s.ttft_s for s in long]),
            "short_e2e_p99_ms": ms_p(99, [s.e2e_s for s in short]),
            "short_done": len(short),
            "long_done": len(long),
            "failed": sum(s.error is not None for s in self.streams),
            "short_tok_s": sum(s.completion_tokens for s in short) / span,
            "gaps": len(gaps),
            "long_prompt_tokens_mean": statistics.mean(s.prompt_tokens for s in long)
            if long
            else nan,
            "short_prompt_tokens_mean": statistics.mean(s.prompt_tokens for s in short)
            if short
            else nan,
            "long_remote": sum(s.prefill_worker not in ("", "local") for s in long),
            "short_remote": sum(s.prefill_worker not in ("", "local") for s in short),
        }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms_p(q: float, values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return percentile(present, q) * 1e3 if present else float("nan")


def ms_p50(values: list[float | None]) -> float:
    return ms_p(50, values)


def warm_up(url: str, model: str, tokenizer: Any) -> None:
    """A few requests of each kind before the window (prompts of their own, so none of the
    measured ones is cached): first requests pay one-off costs (kernels, allocator, the first
    transfer's connection) that are not what is measured."""
    rng = random.Random(-1)
    shorts = [sized_text(tokenizer, rng, f"Warm-up {k}:", 30) for k in range(4)]
    longs = [sized_text(tokenizer, rng, f"Warm-up document {k}.", 1600) for k in range(2)]

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            requests = [stream_completion(client, model, p, 8, "short", 0.0) for p in shorts]
            requests += [stream_completion(client, model, p, 1, "long", 0.0) for p in longs]
            for s in await asyncio.gather(*requests):
                if s.error is not None:
                    raise RuntimeError(f"warm-up request failed: {s.error}")

    asyncio.run(main())


def measure(
    mode: str,
    repeat: int,
    config: Path,
    workload: Workload,
    model: str,
    tokenizer: Any,
    tmp: Path,
    args: argparse.Namespace,
) -> Run:
    log = tmp / f"serve-{mode}-{repeat}.log"
    started = time.perf_counter()
    with serving(mode, config, log, args) as url:
        workers = [{"address": w["address"], "role": w["role"]} for w in router_workers(url)]
        progress(f"  {WORKERS} workers ready in {time.perf_counter() - started:.1f} s: {workers}")
        warm_up(url, model, tokenizer)
        before = {w["address"]: scrape(w["address"]) for w in workers}
        streams, elapsed, exhausted = asyncio.run(run_load(url, model, workload, args))
        after = {w["address"]: scrape(w["address"]) for w in workers}
    kv = {a: delta(after[a], before[a]) for a in after}
    return Run(mode, repeat, elapsed, streams, workers, kv, exhausted, str(log), log_problems(log))


# -- raw bandwidth of the transport ---------------------------------------------------------


def tcp_loopback(size: int, repeats: int) -> dict[str, float]:
    """`size` bytes over a TCP connection on 127.0.0.1, from a sender thread to a receiver that
    reads into a preallocated buffer: the ceiling for any protocol on this loopback. MB/s from
    the sender's first byte to the receiver's last (from the first byte received would say
    little: the kernel buffers most of a few MB before the receiver's first read returns), and
    from the receiver's request to its last byte."""
    payload = os.urandom(size)
    sent: list[float] = []  # when the sender began each payload
    first_to_last: list[float] = []
    whole: list[float] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def sender() -> None:
            conn, _ = server.accept()
            with conn:
                while conn.recv(1):  # one byte asks for one payload; EOF ends
                    sent.append(time.perf_counter())
                    conn.sendall(payload)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        buffer = bytearray(size)
        view = memoryview(buffer)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for i in range(repeats + 1):
                asked = time.perf_counter()
                sock.sendall(b"!")
                got = 0
                while got < size:
                    n = sock.recv_into(view[got:])
                    if n == 0:
                        raise RuntimeError("the sender closed early")
                    got += n
                done = time.perf_counter()
                if i:  # the first round sets up buffers and is left out
                    first_to_last.append(size / (done - sent[i]) / MB)
                    whole.append(size / (done - asked) / MB)
        thread.join(10)
    return {
        "mb_s": statistics.median(first_to_last),
        "request_mb_s": statistics.median(whole),
        "runs": repeats,
    }


def blob_server(port: int) -> None:
    """`--blob-server PORT`: a FastAPI app on uvicorn (as a worker runs it) whose POST /blob
    answers {"size": N} with N bytes of application/octet-stream, as the prefill endpoint
    answers a handoff."""
    app = FastAPI()
    blobs: dict[int, bytes] = {}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/blob")
    async def blob(request: Request) -> Response:
        size = int((await request.json())["size"])
        if size not in blobs:
            blobs[size] = os.urandom(size)
        return Response(blobs[size], media_type="application/octet-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def http_loopback(size: int, repeats: int, startup_timeout: float) -> dict[str, float]:
    """`size` bytes from the blob server in another process, read the way the decode worker
    reads a handoff (httpx.AsyncClient stream, aiter_raw into a bytearray). MB/s from the
    response's start to its last byte (the handoff metric's span) and for the whole request."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--blob-server", str(port)],
        cwd=REPO,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the blob server exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the blob server did not start")
            time.sleep(0.1)

        async def main() -> tuple[list[float], list[float]]:
            first_to_last: list[float] = []
            whole: list[float] = []
            # The decode worker's client settings (disagg/transfer.py, KVPuller.client).
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=16)
            async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=2), limits=limits) as c:
                for i in range(repeats + 1):
                    started = time.perf_counter()
                    async with c.stream("POST", f"{url}/blob", json={"size": size}) as response:
                        answered = time.perf_counter()
                        response.raise_for_status()
                        payload = bytearray()
                        async for chunk in response.aiter_raw():
                            payload += chunk
                        done = time.perf_counter()
                    if len(payload) != size:
                        raise RuntimeError(f"the blob server sent {len(payload)} of {size} bytes")
                    if i:  # the first also creates the blob and the connection
                        first_to_last.append(size / (done - answered) / MB)
                        whole.append(size / (done - started) / MB)
            return first_to_last, whole

        first_to_last, whole = asyncio.run(main())
    finally:
        stop_process(process, timeout=10)
    return {
        "mb_s": statistics.median(first_to_last),
        "request_mb_s": statistics.median(whole),
        "runs": repeats,
    }


# -- report ---------------------------------------------------------------------------------


def transfer_summary(runs: list[Run]) -> dict[str, Any]:
    """The decode worker's handoffs over every disaggregated window, and the prefill worker's
    exports, summed over repeats."""
    decode: dict[str, float] = {}
    prefill: dict[str, float] = {}
    for run in runs:
        roles = {w["address"]: w["role"] for w in run.workers}
        for address, counters in run.kv.items():
            into = decode if roles.get(address) == "decode" else prefill
            for k, v in counters.items():
                into[k] = into.get(k, 0.0) + v
    nbytes = decode.get("bisllm_kv_transfer_bytes_total", 0.0)
    count = decode.get("bisllm_kv_transfers_total", 0.0)
    seconds = decode.get("bisllm_kv_transfer_seconds_sum", 0.0)
    remote_s = decode.get("bisllm_kv_remote_prefill_seconds_sum", 0.0)
    remote_n = decode.get("bisllm_kv_remote_prefill_seconds_count", 0.0)

    def by_reason(prefix: str) -> dict[str, float]:
        return {
            k[len(prefix) + len("{reason=") : -1]: v
            for k, v in decode.items()
            if k.startswith(prefix + "{reason=")
        }

    return {
        "transfers": count,
        "bytes": nbytes,
        "transfer_seconds": seconds,
        "handoff_mb_s": nbytes / seconds / MB if seconds else float("nan"),
        "mean_handoff_bytes": nbytes / count if count else float("nan"),
        "mean_transfer_ms": seconds / count * 1e3 if count else float("nan"),
        "mean_remote_prefill_ms": remote_s / remote_n * 1e3 if remote_n else float("nan"),
        "failures": by_reason("bisllm_kv_transfer_failures_total"),
        "fallbacks": by_reason("bisllm_kv_local_prefill_fallbacks_total"),
        "exported_bytes": prefill.get("bisllm_kv_exported_bytes_total", 0.0),
    }


def medians(runs: list[Run]) -> dict[str, float]:
    summaries = [r.summary() for r in runs]
    return {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}


ITL_COLUMNS = (
    ("ITL p50 (ms)", "itl_p50_ms", "{:.1f}"),
    ("ITL p90 (ms)", "itl_p90_ms", "{:.1f}"),
    ("ITL p99 (ms)", "itl_p99_ms", "{:.1f}"),
    ("ITL p99.9 (ms)", "itl_p999_ms", "{:.0f}"),
    ("ITL max (ms)", "itl_max_ms", "{:.0f}"),
    ("gaps > 100 ms", "gaps_over_100ms", "{:.0f}"),
    ("gaps", "gaps", "{:.0f}"),
)
REQUEST_COLUMNS = (
    ("short TTFT p50 (ms)", "short_ttft_p50_ms", "{:.0f}"),
    ("short e2e p99 (ms)", "short_e2e_p99_ms", "{:.0f}"),
    ("long TTFT p50 (ms)", "long_ttft_p50_ms", "{:.0f}"),
    ("short tok/s", "short_tok_s", "{:.0f}"),
    ("short done", "short_done", "{:.0f}"),
    ("long done", "long_done", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
)
RATIO_KEYS = [key for _, key, _ in ITL_COLUMNS[:6] + REQUEST_COLUMNS[:4]]


def mode_table(
    by_mode: dict[str, dict[str, float]], columns: tuple[tuple[str, str, str], ...]
) -> list[str]:
    """Medians per mode, and disaggregated / aggregated for the figures a ratio suits."""
    a, d = by_mode["aggregated"], by_mode["disaggregated"]
    lines = [
        "| mode | " + " | ".join(c[0] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in (("aggregated (2 workers)", a), ("disaggregated (1P:1D)", d)):
        lines.append(
            f"| {name} | " + " | ".join(fmt.format(row[key]) for _, key, fmt in columns) + " |"
        )
    ratio = [
        (f"{d[key] / a[key]:.2f}x" if a[key] else "-") if key in RATIO_KEYS else ""
        for _, key, _ in columns
    ]
    lines.append("| **disaggregated / aggregated** | " + " | ".join(ratio) + " |")
    return [*lines, ""]


def repeat_lines(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        s = run.summary()
        lines.append(
            f"- {run.mode} repeat {run.repeat + 1}: ITL p50 {s['itl_p50_ms']:.1f} / p99 "
            f"{s['itl_p99_ms']:.1f} / p99.9 {s['itl_p999_ms']:.0f} / max {s['itl_max_ms']:.0f} "
            f"ms, {s['gaps_over_100ms']:.0f} gaps > 100 ms, TTFT short "
            f"{s['short_ttft_p50_ms']:.0f} / long {s['long_ttft_p50_ms']:.0f} ms, "
            f"{s['short_done']:.0f} short + {s['long_done']:.0f} long done, "
            f"{s['failed']:.0f} failed; long prefilled remotely {s['long_remote']:.0f}, "
            f"short {s['short_remote']:.0f}"
        )
    return lines


def transfer_lines(t: dict[str, Any], tcp: dict[str, float], http: dict[str, float]) -> list[str]:
    return [
        "### K/V handoffs (decode worker, all disaggregated windows) against raw loopback",
        "",
        "| path | MB/s | handoff / it |",
        "|---|---:|---:|",
        f"| handoffs received (bisllm_kv_transfer_bytes / _seconds) | {t['handoff_mb_s']:.0f} "
        "| 1.00x |",
        f"| raw TCP loopback, first byte sent to last received | {tcp['mb_s']:.0f} "
        f"| {t['handoff_mb_s'] / tcp['mb_s']:.3f}x |",
        f"| HTTP loopback (uvicorn + httpx), response start to last byte | {http['mb_s']:.0f} "
        f"| {t['handoff_mb_s'] / http['mb_s']:.3f}x |",
        "",
        f"- {t['transfers']:.0f} handoffs, {t['bytes'] / MB:.1f} MB in all; mean handoff "
        f"{t['mean_handoff_bytes'] / MB:.2f} MB received in {t['mean_transfer_ms']:.1f} ms; mean "
        f"remote prefill (ask to answer) {t['mean_remote_prefill_ms']:.0f} ms; prefill worker "
        f"exported {t['exported_bytes'] / MB:.1f} MB",
        f"- whole request (request sent to last byte): TCP {tcp['request_mb_s']:.0f} MB/s, "
        f"HTTP {http['request_mb_s']:.0f} MB/s (medians of {tcp['runs']} and {http['runs']})",
        f"- transfer failures: {fmt_reasons(t['failures'])}; local-prefill fallbacks: "
        f"{fmt_reasons(t['fallbacks'])}",
        "",
    ]


def fmt_reasons(counts: dict[str, float]) -> str:
    nonzero = {k: v for k, v in counts.items() if v}
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(nonzero.items())) or "none"


def raw(run: Run) -> dict[str, Any]:
    return {
        "mode": run.mode,
        "repeat": run.repeat,
        "elapsed_s": run.elapsed_s,
        "workers": run.workers,
        "summary": run.summary(),
        "kv_counters": run.kv,
        "prompts_exhausted": run.exhausted,
        "log": run.log,
        "log_problems": run.log_problems[:50],
        "requests": [{**asdict(s), "gaps_s": [round(g, 6) for g in s.gaps_s]} for s in run.streams],
    }


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()} {model}, {os.cpu_count()} cores, {memory:.1f} GiB"


def command_python() -> str:
    """The interpreter as typed from the repository (.venv/bin/python), else its full path."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def on_sigterm(signum: int, frame: Any) -> None:
    # As Ctrl-C: unwind, so every `finally` stops the processes this script started.
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Repeats of each mode.")
    parser.add_argument("--window", type=float, default=36.0, help="Seconds of load per repeat.")
    parser.add_argument("--clients", type=int, default=3, help="Concurrent short clients.")
    parser.add_argument("--interval", type=float, default=1.5, help="Seconds between long prompts.")
    parser.add_argument("--dtype", default="auto", help="The workers' --dtype.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bandwidth-repeats", type=int, default=30)
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1 repeat, 12 s window.")
    parser.add_argument("--json", type=Path, help="Also write every figure here.")
    parser.add_argument("--blob-server", type=int, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.blob_server is not None:
        blob_server(args.blob_server)
        return
    if args.quick:
        args.repeats, args.window = 1, 12.0
    signal.signal(signal.SIGTERM, on_sigterm)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
    # Texts are generated long and cut to size on token ids; the context limit is the server's.
    tokenizer.model_max_length = 1 << 30
    model = yaml.safe_load(CONFIG.read_text())["model_name"]
    results: dict[str, Any] = {
        "command": shlex.join([command_python(), *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "model": model,
        "dtype": args.dtype,
        "settings": {
            "repeats": args.repeats,
            "window_s": args.window,
            "short_clients": args.clients,
            "short_prompt_tokens": SHORT_TOKENS,
            "short_output_tokens": SHORT_OUTPUT,
            "long_interval_s": args.interval,
            "long_prompt_tokens": LONG_TOKENS,
            "max_local_prefill_tokens": MAX_LOCAL_PREFILL,
            "workers": WORKERS,
            "omp_num_threads": 1,
            "seed": args.seed,
        },
    }
    runs: list[Run] = []
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-disagg-") as tmp_name:
        tmp = Path(tmp_name)
        # Logs outlive the run, for a look at what the workers said.
        logs = Path(tempfile.mkdtemp(prefix="bench-disagg-logs-"))
        configs = write_configs(tmp)
        try:
            for repeat in range(args.repeats):
                workload = make_workload(
                    tokenizer, args.seed * 1009 + repeat, args.clients, args.window, args.interval
                )
                for mode in MODES:
                    progress(f"{mode}, repeat {repeat + 1}/{args.repeats}: starting")
                    run = measure(
                        mode, repeat, configs[mode], workload, model, tokenizer, logs, args
                    )
                    runs.append(run)
                    progress(repeat_lines([run])[0].removeprefix("- "))
                    if run.exhausted:
                        progress("  warning: a short client ran out of prompts")
                    if run.log_problems:
                        progress(f"  {len(run.log_problems)} warning/error line(s) in {run.log}")
        except KeyboardInterrupt:
            progress("interrupted: every process this run started has been stopped")
            sys.exit(130)

    disagg = [r for r in runs if r.mode == "disaggregated"]
    transfer = transfer_summary(disagg)
    size = transfer["mean_handoff_bytes"]
    if math.isnan(size):
        sys.exit("error: no K/V handoff was received in the disaggregated runs")
    size = int(size)
    progress(f"raw bandwidth: {size / MB:.2f} MB over TCP, then HTTP, loopback")
    tcp = tcp_loopback(size, args.bandwidth_repeats)
    http = http_loopback(size, args.bandwidth_repeats, args.startup_timeout)

    by_mode = {mode: medians([r for r in runs if r.mode == mode]) for mode in MODES}
    a, d = by_mode["aggregated"], by_mode["disaggregated"]
    ratios = {key: d[key] / a[key] if a[key] else float("nan") for key in RATIO_KEYS}
    lines = [
        "## Disaggregated prefill/decode vs aggregated, 2 workers each",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; machine: {results['machine']}; load average at start "
        + ", ".join(f"{x:.2f}" for x in results["load_average_at_start"]),
        f"- model: {model}, dtype {args.dtype}, one thread per worker; {args.clients} short "
        f"clients (~30-token prompts, {SHORT_OUTPUT} tokens out) and a "
        f"{LONG_TOKENS[0]}-{LONG_TOKENS[1]}-token prompt every {args.interval:g} s, "
        f"{args.window:g} s per repeat; --max-local-prefill-tokens {MAX_LOCAL_PREFILL}",
        f"- wall time: {time.perf_counter() - total:.0f} s",
        "",
        f"### Short streams while long prompts arrive (medians of {args.repeats} repeat(s))",
        "",
        "Inter-token gaps of the short streams, all of a repeat pooled:",
        "",
        *mode_table(by_mode, ITL_COLUMNS),
        "Requests:",
        "",
        *mode_table(by_mode, REQUEST_COLUMNS),
        f"disaggregated / aggregated: ITL p50 {ratios['itl_p50_ms']:.2f}x, "
        f"p99 {ratios['itl_p99_ms']:.2f}x",
        "",
        *repeat_lines(runs),
        "",
        *transfer_lines(transfer, tcp, http),
    ]
    problems = sum(len(r.log_problems) for r in runs)
    lines.append(f"- serve logs: {logs} ({problems} warning/error line(s))")
    print("\n".join(lines))

    results.update(
        {
            "by_mode": by_mode,
            "disaggregated_over_aggregated": ratios,
            "transfer": transfer,
            "raw_bandwidth": {"size_bytes": size, "tcp_loopback": tcp, "http_loopback": http},
            "handoff_over_raw": {
                "tcp": transfer["handoff_mb_s"] / tcp["mb_s"],
                "http": transfer["handoff_mb_s"] / http["mb_s"],
            },
            "logs": str(logs),
            "runs": [raw(r) for r in runs],
        }
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
