"""Serving overhead of `bisllm serve`: one streamed workload sent to the OpenAI server and to the
engine in-process, at client concurrency 1, 8 and 32, reported as server/direct ratios.

    .venv/bin/python benchmarks/bench_server.py [--requests 32] [--max-tokens 64] [--repeats 3]
    .venv/bin/python benchmarks/bench_server.py --quick          # smoke run: 8 requests, 1 repeat
    .venv/bin/python benchmarks/bench_server.py --json results.json

Model: the embedded default model (examples/bisllm-tiny-moe), as `bisllm serve` with no config
serves it. The direct path is `AsyncEngine(LLMEngine(...))` with the engine sizes the server takes
from the same config, so the ratios isolate HTTP, JSON/SSE and the OpenAI layer.

Workload: a few chat questions rendered through the checkpoint's chat template; both paths get
the same token ids (the server as a token-id `/v1/completions` prompt), greedy, `ignore_eos`, so
every request yields exactly --max-tokens tokens. A level with concurrency c keeps c requests in
flight and sends max(--requests, 2c) requests in all.

Metrics, per request as the client sees it: TTFT (until the first chunk with text), inter-token
latency (gap between token-bearing chunks, per token), end-to-end latency; per level, output
throughput (all output tokens / the level's wall time). Each level runs --repeats times per path;
the tables give the medians over repeats.

The client (the OpenAI SDK parsing SSE) runs in this process on the same cores as the server, so
the server path also pays for its load generator; the report gives the CPU cores each side used
(psutil on the server's pid) so the ratios can be read with that in mind.

The paths run one after the other (direct first, then the server) so they never share the CPU.
Warm-up sends every prompt once on each path: it builds the CPU kernels and puts every prompt in
the prefix cache, so every measured request on both paths starts with its prompt cached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import torch

from bisllm_server.engine.async_engine import AsyncEngine
from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.openai.launch import resolve_model_dir
from bisllm_truss.validate import validate_file

REPO = Path(__file__).resolve().parents[1]
# What `bisllm serve` serves when given no config.
CONFIG = REPO / "examples" / "bisllm-tiny-moe" / "config.yaml"
CONCURRENCY = (1, 8, 32)
WARMUP_TOKENS = 4

# Everyday questions of the kind the default model was trained on; their lengths differ a little,
# as real prompts do.
QUESTIONS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Why is the sky blue?",
    "Give me three tips for sleeping better.",
    "What is the difference between a list and a tuple in Python?",
    "How many days are there in a leap year?",
    "Explain what a prime number is.",
    "Suggest a name for a small bakery.",
)


@dataclass
class Sample:
    """One request as its client saw it."""

    prompt: int  # index into the prompt list
    ttft: float
    e2e: float
    tokens: int  # tokens counted from the stream
    reported: int  # tokens the path says it produced (usage / num_output_tokens)
    gaps: list[float]  # inter-token latency, one entry per token after the first
    text: str


class Clock:
    """Timestamps of one request's stream, from the moment the request is sent."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_text: float | None = None
        self.first_token: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.gaps: list[float] = []
        self.parts: list[str] = []

    def event(self, tokens: int, text: str) -> None:
        now = time.perf_counter()
        if text and self.first_text is None:
            self.first_text = now
        if tokens:
            if self.last is None:
                self.first_token = now
            else:
                # A chunk of k tokens counts as k tokens each 1/k of the gap apart: ITL per token.
                self.gaps.extend([(now - self.last) / tokens] * tokens)
            self.last = now
            self.tokens += tokens
        self.parts.append(text)

    def sample(self, prompt: int, reported: int) -> Sample:
        end = time.perf_counter()
        # A held-back partial UTF-8 character can leave the first token without text; a stream
        # with no text at all falls back to its first token.
        first = self.first_text or self.first_token or end
        return Sample(
            prompt=prompt,
            ttft=first - self.start,
            e2e=end - self.start,
            tokens=self.tokens,
            reported=reported,
            gaps=self.gaps,
            text="".join(self.parts),
        )


# (prompt ids, prompt index, max_tokens) -> the request's Sample
Send = Callable[[list[int], int, int], Awaitable[Sample]]
# CPU seconds used so far by the serving process, when it is not this one
CpuClock = Callable[[], float]


def no_server() -> float:
    return 0.0


@dataclass
class Run:
    """One level, one repeat, one path."""

    path: str
    concurrency: int
    repeat: int
    wall: float
    cpu: float  # this process's CPU seconds over the level (threads summed)
    server_cpu: float  # the server process's CPU seconds over the level; 0 on the direct path
    samples: list[Sample] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        ttfts = [s.ttft for s in self.samples]
        gaps = [g for s in self.samples for g in s.gaps]
        return {
            "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
            "ttft_p90_ms": percentile(ttfts, 90) * 1e3,
            "itl_p50_ms": percentile(gaps, 50) * 1e3 if gaps else float("nan"),
            "e2e_p50_s": percentile([s.e2e for s in self.samples], 50),
            "tok_s": sum(s.tokens for s in self.samples) / self.wall,
        }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); fine for one value."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def resolve_device(requested: str) -> str:
    # The server's rule for "auto", so both paths land on the same device.
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_spec() -> Any:
    result = validate_file(CONFIG)
    if not result.ok or result.spec is None:
        sys.exit(f"{CONFIG} does not validate: {[str(i) for i in result.issues]}")
    return result.spec


def engine_config(spec: Any, device: str) -> EngineConfig:
    """The EngineConfig `build_server` makes for this spec (launch.py): same sizes, same dtype."""
    engine = spec.engine
    return EngineConfig(
        # The server looks in its working directory (the repository) first, as here.
        model=resolve_model_dir(spec, [REPO]),
        dtype="auto",
        device=resolve_device(device),
        max_batch_size=engine.max_batch_size,
        max_num_tokens=engine.max_num_tokens,
        max_seq_len=engine.max_seq_len,
        enable_chunked_prefill=engine.enable_chunked_prefill,
    )


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    """Each question as the chat endpoint would render it. The template writes its own special
    tokens, so the text is encoded without adding any (as the server's render_chat does)."""
    prompts = []
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return prompts


def level_requests(requests: int, concurrency: int) -> int:
    # At least two requests per client, so the level measures a steady state and not one wave.
    return max(requests, 2 * concurrency)


async def run_level(
    send: Send,
    prompts: list[list[int]],
    concurrency: int,
    count: int,
    max_tokens: int,
    server_clock: CpuClock,
) -> tuple[float, float, float, list[Sample]]:
    """`count` requests (the prompts in turn) from `concurrency` clients that each send their
    next request as soon as the previous one ends; returns (wall s, this process's CPU s, the
    server's CPU s, samples)."""
    pending = iter(i % len(prompts) for i in range(count))  # shared: each client takes the next
    samples: list[Sample] = []

    async def client() -> None:
        for index in pending:
            samples.append(await send(prompts[index], index, max_tokens))

    start, cpu, server_cpu = time.perf_counter(), time.process_time(), server_clock()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return (
        time.perf_counter() - start,
        time.process_time() - cpu,
        server_clock() - server_cpu,
        samples,
    )


async def run_plan(
    path: str,
    send: Send,
    prompts: list[list[int]],
    args: argparse.Namespace,
    server_clock: CpuClock = no_server,
) -> list[Run]:
    # Warm-up: every prompt once, all at once, so later requests find their prompt cached.
    await asyncio.gather(
        *(send(ids, i, WARMUP_TOKENS) for i, ids in enumerate(prompts)),
    )
    runs = []
    # Repeats outermost, so slow drift of the machine spreads over all levels alike.
    for repeat in range(args.repeats):
        for concurrency in CONCURRENCY:
            count = level_requests(args.requests, concurrency)
            wall, cpu, server_cpu, samples = await run_level(
                send, prompts, concurrency, count, args.max_tokens, server_clock
            )
            run = Run(path, concurrency, repeat, wall, cpu, server_cpu, samples)
            s = run.summary()
            print(
                f"  {path:>6} c={concurrency:<2} repeat {repeat + 1}/{args.repeats}: "
                f"TTFT p50 {s['ttft_p50_ms']:7.1f} ms  ITL p50 {s['itl_p50_ms']:6.2f} ms  "
                f"e2e p50 {s['e2e_p50_s']:6.2f} s  {s['tok_s']:7.1f} tok/s  "
                f"(CPU cores: {cores(run)})",
                flush=True,
            )
            runs.append(run)
    return runs


# -- direct path ------------------------------------------------------------------------------


async def direct_request(
    engine: AsyncEngine, ids: list[int], index: int, max_tokens: int
) -> Sample:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    clock = Clock()
    reported = 0
    # Detokenized, as the server's requests are, so both paths do the same engine work.
    async for out in engine.generate(ids, params):
        clock.event(len(out.new_token_ids), out.new_text)
        reported = out.num_output_tokens
    return clock.sample(index, reported)


def measure_direct(
    config: EngineConfig, prompts: list[list[int]], args: argparse.Namespace
) -> list[Run]:
    engine = AsyncEngine(LLMEngine(config))
    engine.start()
    try:

        async def send(ids: list[int], index: int, max_tokens: int) -> Sample:
            return await direct_request(engine, ids, index, max_tokens)

        return asyncio.run(run_plan("direct", send, prompts, args))
    finally:
        engine.shutdown()


# -- server path ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Until GET /health answers 200; loading the model takes a while."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bisllm serve exited with status {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"bisllm serve was not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def serving(device: str, startup_timeout: float) -> Iterator[tuple[str, int]]:
    """`bisllm serve` (the default model) on a free port; yields (base URL, pid). SIGINT stops
    it the way an operator would, also when the benchmark fails."""
    port = free_port()
    bisllm = Path(sys.executable).parent / "bisllm"
    command = [str(bisllm), "serve", "--port", str(port), "--log-level", "warning"]
    command += ["--device", device]
    process = subprocess.Popen(command, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, startup_timeout)
        yield url, process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def server_request(
    client: openai.AsyncOpenAI, model: str, ids: list[int], index: int, max_tokens: int
) -> Sample:
    clock = Clock()
    reported = -1  # stays -1 if the usage chunk never comes
    stream = await client.completions.create(
        model=model,
        prompt=ids,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices:
            # The server sends one chunk per engine output, and the engine adds one token per
            # request per step; the usage count checks this.
            clock.event(1, chunk.choices[0].text)
        if chunk.usage is not None:
            reported = chunk.usage.completion_tokens
    return clock.sample(index, reported)


def measure_server(model: str, prompts: list[list[int]], args: argparse.Namespace) -> list[Run]:
    with serving(args.device, args.startup_timeout) as (url, pid):
        server_process = psutil.Process(pid)

        def server_clock() -> float:
            times = server_process.cpu_times()
            return times.user + times.system

        async def main() -> list[Run]:
            client = openai.AsyncOpenAI(
                base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300
            )
            async with client:

                async def send(ids: list[int], index: int, max_tokens: int) -> Sample:
                    return await server_request(client, model, ids, index, max_tokens)

                return await run_plan("server", send, prompts, args, server_clock)

        return asyncio.run(main())


# -- report -----------------------------------------------------------------------------------


def medians(runs: list[Run]) -> dict[str, float]:
    summaries = [r.summary() for r in runs]
    return {key: statistics.median(s[key] for s in summaries) for key in summaries[0]}


def level_table(concurrency: int, count: int, direct: dict, server: dict) -> list[str]:
    ratios = {key: server[key] / direct[key] for key in direct}
    lines = [
        f"### Concurrency {concurrency} ({count} requests)",
        "",
        "| concurrency | path | TTFT p50 (ms) | TTFT p90 (ms) | ITL p50 (ms) | e2e p50 (s) "
        "| throughput (tok/s) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("direct", direct), ("server", server)):
        lines.append(
            f"| {concurrency} | {name} | {row['ttft_p50_ms']:.1f} | {row['ttft_p90_ms']:.1f} "
            f"| {row['itl_p50_ms']:.2f} | {row['e2e_p50_s']:.3f} | {row['tok_s']:.1f} |"
        )
    lines.append(
        f"| {concurrency} | server/direct | {ratios['ttft_p50_ms']:.2f}x "
        f"| {ratios['ttft_p90_ms']:.2f}x | {ratios['itl_p50_ms']:.2f}x "
        f"| {ratios['e2e_p50_s']:.2f}x | {ratios['tok_s']:.2f}x |"
    )
    return [*lines, ""]


def cores(run: Run) -> str:
    """CPU use over a run, in cores: the engine's process on the direct path; on the server
    path the server and the client (this process), which takes its share of a small machine."""
    if run.path == "direct":
        return f"{run.cpu / run.wall:.2f}"
    return f"server {run.server_cpu / run.wall:.2f} + client {run.cpu / run.wall:.2f}"


def median_cores(runs: list[Run], concurrency: int) -> str:
    level = [r for r in runs if r.concurrency == concurrency]
    middle = statistics.median_low(r.wall for r in level)  # one real run, not a blend
    return cores(next(r for r in level if r.wall == middle))


def token_problems(runs: list[Run], max_tokens: int) -> list[str]:
    """Requests that did not stream, or did not report, exactly max_tokens tokens."""
    problems = []
    for run in runs:
        for s in run.samples:
            if s.tokens != max_tokens or s.reported != max_tokens:
                problems.append(
                    f"{run.path} c={run.concurrency} repeat {run.repeat + 1} prompt {s.prompt}: "
                    f"streamed {s.tokens} tokens, reported {s.reported}, expected {max_tokens}"
                )
    return problems


def same_text(direct: list[Run], server: list[Run]) -> tuple[int, int]:
    """(prompts with identical greedy text on both paths, prompts) in the first concurrency-1
    run, where each request is decoded alone and so deterministically."""

    def texts(runs: list[Run]) -> dict[int, str]:
        first = next(r for r in runs if r.concurrency == 1 and r.repeat == 0)
        return {s.prompt: s.text for s in first.samples}

    ours, theirs = texts(direct), texts(server)
    shared = sorted(set(ours) & set(theirs))
    return sum(ours[p] == theirs[p] for p in shared), len(shared)


def raw(run: Run) -> dict[str, Any]:
    return {
        "path": run.path,
        "concurrency": run.concurrency,
        "repeat": run.repeat,
        "wall_s": run.wall,
        "process_cpu_s": run.cpu,
        "server_cpu_s": run.server_cpu,
        "summary": run.summary(),
        "requests": [
            {
                "prompt": s.prompt,
                "ttft_s": s.ttft,
                "e2e_s": s.e2e,
                "tokens": s.tokens,
                "reported_tokens": s.reported,
                "itl_s": [round(g, 7) for g in s.gaps],
            }
            for s in run.samples
        ],
    }


def command_python() -> str:
    """The interpreter as typed from the repository (.venv/bin/python), else its full path."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith("..") else relative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=32, help="Requests per level (at least 2 per client)."
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="Smoke run: 8 requests, 1 repeat.")
    parser.add_argument(
        "--device", default="auto", help="auto (the server's default), cpu or cuda."
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=300, help="Seconds for the server to get healthy."
    )
    parser.add_argument("--json", type=Path, help="Also write the raw numbers here.")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.repeats = 8, 1

    spec = load_spec()
    config = engine_config(spec, args.device)
    from transformers import AutoTokenizer

    prompts = chat_prompts(AutoTokenizer.from_pretrained(config.model))
    results: dict[str, Any] = {
        "command": shlex.join([command_python(), *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": spec.served_model_name,
        "engine": {
            "device": config.device,
            "max_batch_size": config.max_batch_size,
            "max_num_tokens": config.max_num_tokens,
            "max_seq_len": config.max_seq_len,
            "enable_chunked_prefill": config.enable_chunked_prefill,
        },
        "prompt_tokens": [len(p) for p in prompts],
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
    }
    print(f"direct: in-process AsyncEngine on {config.device}", flush=True)
    direct = measure_direct(config, prompts, args)
    print("server: bisllm serve, /v1/completions streamed", flush=True)
    server = measure_server(spec.served_model_name, prompts, args)

    lines = [
        "## bisllm serve vs the engine in-process",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}",
        f"- machine: {results['machine']} (OMP_NUM_THREADS={results['omp_num_threads']}), "
        f"torch {results['torch']}, Python {results['python']}",
        f"- model: {results['model']} on {config.device}; prompts of "
        f"{min(results['prompt_tokens'])}-{max(results['prompt_tokens'])} tokens (cached after "
        f"warm-up), {args.max_tokens} output tokens each; medians of {args.repeats} repeat(s)",
        "",
    ]
    results["levels"] = []
    for concurrency in CONCURRENCY:
        d = medians([r for r in direct if r.concurrency == concurrency])
        s = medians([r for r in server if r.concurrency == concurrency])
        count = level_requests(args.requests, concurrency)
        lines += level_table(concurrency, count, d, s)
        results["levels"].append(
            {
                "concurrency": concurrency,
                "requests": count,
                "direct": d,
                "server": s,
                "server_over_direct": {key: s[key] / d[key] for key in d},
            }
        )
    problems = token_problems(direct + server, args.max_tokens)
    identical, compared = same_text(direct, server)
    if problems:
        lines.append(f"- token counts: {len(problems)} request(s) off:")
        lines += [f"  - {p}" for p in problems[:20]]
    else:
        lines.append(
            f"- token counts: every request gave exactly {args.max_tokens} tokens on both paths"
        )
    lines.append(
        f"- greedy text at concurrency 1: {identical}/{compared} prompts identical on both paths"
    )
    for name, runs in (("direct", direct), ("server", server)):
        load = "; ".join(f"c={c} {median_cores(runs, c)}" for c in CONCURRENCY)
        lines.append(f"- CPU cores used, {name} (run of median wall time): {load}")
    print()
    print("\n".join(lines))
    results["token_problems"] = problems
    results["identical_text"] = {"identical": identical, "compared": compared}
    results["runs"] = [raw(r) for r in direct + server]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
