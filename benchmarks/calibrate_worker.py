"""Measure the embedded model's step times on this machine and fit the autoscaling simulator's
worker profile (bisllm_server.autoscaler.capacity) to them.

    .venv/bin/python benchmarks/calibrate_worker.py [--out server/autoscaler/profiles/embedded-cpu.json]
        [--repeats 5] [--no-startup]

Runs the real `LLMEngine` offline on examples/bisllm-tiny-moe/checkpoint, configured as
`bisllm serve examples/bisllm-tiny-moe/config.yaml` runs it on CPU (max_batch_size 32, the
checkpoint's 2,048-token max_seq_len) with the engine's default 2,048-token step budget, and
times `engine.stats.step_seconds` for:

- prefill steps of one prompt (16 to 2,040 tokens),
- pure decode steps of 1 to 32 requests over 64- to 1,536-token contexts,
- mixed steps: a prompt prefilled beside a running decode batch (checks that the terms add).

Every point is the median over `--repeats` runs (over the steps of a run, for decode). The
step-time model is fitted to the medians by least squares on relative error (a 5 ms step
matters as much as a 400 ms one), with coefficients kept >= 0. Startup is the median wall time
of a fresh process that imports the engine, loads the checkpoint and serves one request.
About 2 minutes on a 2-core box. The profile serves at batch 8, not 32: see SERVE_BATCH_SIZE.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bisllm_server.autoscaler.capacity import WorkerProfile
from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
DEFAULT_OUT = REPO / "server" / "autoscaler" / "profiles" / "embedded-cpu.json"
MAX_BATCH_SIZE = 32  # examples/bisllm-tiny-moe/config.yaml: the measured batches go up to it
# The batch the profile serves with. Beyond ~8 the padded attention of a step with a prefill
# (sequences x longest query x longest KV) costs more than the batch gains on this CPU: a
# simulated worker at 32 under a backlog falls into seconds-long steps and never recovers.
SERVE_BATCH_SIZE = 8
MAX_NUM_TOKENS = 2048  # EngineConfig's default step budget
PREFILL_LENGTHS = (16, 64, 128, 256, 384, 512, 768, 1024, 1536, 2040)
DECODE_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32)
DECODE_CONTEXTS = (64, 512, 1024, 1536)
MIXED = ((1, 256, 512), (8, 256, 128), (8, 256, 1024), (31, 256, 128), (31, 256, 512))
MIXED += ((16, 1024, 256),)
COLUMNS = ("base_s", "per_prefill_token_s", "per_decode_seq_s", "per_kv_token_s")
COLUMNS += ("per_padded_pair_s",)


@dataclass(frozen=True)
class Point:
    kind: str  # prefill, decode or mixed
    prefill_tokens: int
    padded_pairs: int  # sequences x longest query x longest KV, in steps with a prefill
    decode_batch: int
    kv_tokens: float
    step_s: float  # median

    def row(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.decode_batch, self.kv_tokens, self.padded_pairs]


class Calibrator:
    def __init__(self, repeats: int, seed: int = 0) -> None:
        self.repeats = repeats
        self.rng = random.Random(seed)
        self.engine = LLMEngine(
            EngineConfig(
                model=CHECKPOINT,
                max_batch_size=MAX_BATCH_SIZE,
                max_num_tokens=MAX_NUM_TOKENS,
            ),
            tokenizer=None,
        )

    def prompt(self, n: int) -> list[int]:
        # Fresh random ids every time, so the prefix cache never shortens a prefill.
        return [self.rng.randrange(10, 4000) for _ in range(n)]

    def add(self, prompt_len: int, max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(self.prompt(prompt_len), params, detokenize=False)

    def drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def warm_up(self) -> None:
        for n in (32, 512, 2040):
            self.add(n, 4)
        self.drain()

    def prefill(self, length: int) -> Point:
        times = []
        for _ in range(self.repeats):
            self.add(length, 1)
            while self.engine.has_unfinished_requests():
                self.engine.step()
                if self.engine.stats.prefill_tokens:
                    times.append(self.engine.stats.step_seconds)
        return Point("prefill", length, length * length, 0, 0.0, statistics.median(times))

    def decode(self, context: int) -> list[Point]:
        """Pure-decode steps of every DECODE_BATCHES size over `context`-token prompts: one
        prefill of the largest batch, then requests are aborted down to each smaller size."""
        steps = 2 * self.repeats  # steps per batch size: the medians' samples
        sizes = sorted(DECODE_BATCHES, reverse=True)
        ids = [f"decode-{context}-{i}" for i in range(sizes[0])]
        prefill_steps = -(-sizes[0] * context // MAX_NUM_TOKENS) + 1
        params = SamplingParams(
            max_tokens=prefill_steps + (steps + 2) * len(sizes), temperature=0.0, ignore_eos=True
        )
        for rid in ids:
            self.engine.add_request(self.prompt(context), params, request_id=rid, detokenize=False)
        while self.engine.stats.decode_tokens < sizes[0]:  # until the whole batch decodes
            self.engine.step()
        points = []
        for size in sizes:
            for rid in ids[size:]:
                self.engine.abort(rid)
            del ids[size:]
            times, kv = [], []
            while len(times) < steps:
                before = self.engine.stats
                self.engine.step()
                s = self.engine.stats
                # The step attends to every sequence as it stood before it: the previous
                # snapshot's in-flight tokens, when exactly these requests were decoding.
                if s.prefill_tokens == 0 and s.decode_tokens == before.num_running == size:
                    times.append(s.step_seconds)
                    kv.append(before.in_flight_tokens)
            points.append(
                Point("decode", 0, 0, size, statistics.median(kv), statistics.median(times))
            )
        for rid in ids:
            self.engine.abort(rid)
        self.drain()
        return points

    def mixed(self, batch: int, context: int, prompt_len: int) -> Point:
        """A `prompt_len` prefill beside `batch` decoding requests of `context`-token prompts."""
        times, kv = [], []
        ids = [f"mixed-{batch}-{context}-{prompt_len}-{i}" for i in range(batch)]
        prefill_steps = -(-batch * context // MAX_NUM_TOKENS) + 1
        params = SamplingParams(
            max_tokens=prefill_steps + 4 * self.repeats, temperature=0.0, ignore_eos=True
        )
        for rid in ids:
            self.engine.add_request(self.prompt(context), params, request_id=rid, detokenize=False)
        while self.engine.stats.decode_tokens < batch:  # until the whole batch decodes
            self.engine.step()
        for _ in range(self.repeats):
            before = self.engine.stats
            self.add(prompt_len, 1)
            self.engine.step()
            s = self.engine.stats
            if s.prefill_tokens == prompt_len and s.decode_tokens == batch:
                times.append(s.step_seconds)
                kv.append(before.in_flight_tokens)
            self.engine.step()  # a pure decode step between samples
        for rid in ids:
            self.engine.abort(rid)
        self.drain()
        kv_tokens = statistics.median(kv)
        # The engine pads a step with prefill to a rectangle: sequences x longest query x
        # longest KV (here the decoders', each about kv_tokens / batch long).
        padded = (batch + 1) * prompt_len * max(prompt_len, round(kv_tokens / batch) + 1)
        return Point("mixed", prompt_len, padded, batch, kv_tokens, statistics.median(times))


def chunked(repeats: int) -> list[Point]:
    """Prefill chunks after earlier chunks of the same prompt (their attention reaches back),
    on an engine with a 512-token step budget: the chunk at offset p of a 2,040-token prompt."""
    engine = LLMEngine(
        EngineConfig(model=CHECKPOINT, max_batch_size=MAX_BATCH_SIZE, max_num_tokens=512),
        tokenizer=None,
    )
    rng = random.Random(1)
    samples: dict[tuple[int, int], list[float]] = {}
    for _ in range(repeats + 1):  # the first round warms the engine up
        prompt = [rng.randrange(10, 4000) for _ in range(2040)]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        engine.add_request(prompt, params, detokenize=False)
        done = 0
        while engine.has_unfinished_requests():
            engine.step()
            chunk = engine.stats.prefill_tokens
            if chunk:
                samples.setdefault((chunk, done), []).append(engine.stats.step_seconds)
                done += chunk
    return [
        Point("chunked", c, c * (p + c), 0, 0.0, statistics.median(t[1:]))
        for (c, p), t in sorted(samples.items())
        if p > 0
    ]


def fit(points: list[Point]) -> tuple[dict[str, float], dict[str, float]]:
    """Non-negative least squares on relative error (an active set: drop a column that comes
    out negative and refit); returns the coefficients and the fit quality."""
    x = np.array([p.row() for p in points], dtype=np.float64)
    y = np.array([p.step_s for p in points], dtype=np.float64)
    active = list(range(x.shape[1]))
    while True:
        w = x[:, active] / y[:, None]
        coef, *_ = np.linalg.lstsq(w, np.ones_like(y), rcond=None)
        negative = [active[i] for i, c in enumerate(coef) if c < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda i: coef[active.index(i)]))
    full = np.zeros(x.shape[1])
    full[active] = coef
    predicted = x @ full
    residual = y - predicted
    relative = np.abs(residual) / y
    quality = {
        "r2": float(1 - (residual**2).sum() / ((y - y.mean()) ** 2).sum()),
        "median_rel_error": float(np.median(relative)),
        "max_rel_error": float(relative.max()),
        "points": len(points),
    }
    for kind in ("prefill", "chunked", "decode", "mixed"):
        mask = np.array([p.kind == kind for p in points])
        if mask.any():
            quality[f"median_rel_error_{kind}"] = float(np.median(relative[mask]))
    return dict(zip(COLUMNS, map(float, full), strict=True)), quality


def measure_startup(repeats: int) -> float:
    """Median wall time of a fresh process: import, load the checkpoint, serve one request."""
    code = (
        "from bisllm_server.engine.config import EngineConfig\n"
        "from bisllm_server.engine.engine import LLMEngine\n"
        "from bisllm_server.engine.sampling import SamplingParams\n"
        f"e = LLMEngine(EngineConfig(model={str(CHECKPOINT)!r}, max_batch_size=32))\n"
        "e.generate([[5, 6, 7]], [SamplingParams(max_tokens=1)], detokenize=False)\n"
    )
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--no-startup", action="store_true", help="Keep startup_s from the existing --out file."
    )
    args = parser.parse_args()
    started = time.perf_counter()
    cal = Calibrator(args.repeats)
    cal.warm_up()
    points = [cal.prefill(n) for n in PREFILL_LENGTHS]
    print(f"prefill points done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    points += [p for c in DECODE_CONTEXTS for p in cal.decode(c)]
    print(f"decode points done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    points += [cal.mixed(*m) for m in MIXED]
    points += chunked(args.repeats)
    print(f"mixed and chunked points done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    coefficients, quality = fit(points)
    if args.no_startup:
        startup = json.loads(args.out.read_text(encoding="utf-8"))["startup_s"]
    else:
        startup = measure_startup(3)
    kv_capacity = cal.engine.num_kv_pages * cal.engine.page_size
    today = datetime.date.today().isoformat()
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU, torch {_torch_threads()} threads"
    source = (
        f"benchmarks/calibrate_worker.py, {today}: bisllm-tiny-moe ({cal.engine.model_config.dtype},"
        f" CPU) on {machine}; R^2 {quality['r2']:.4f}, median relative error "
        f"{quality['median_rel_error']:.1%} over {quality['points']} median points; measured "
        f"up to batch {MAX_BATCH_SIZE}, served at {SERVE_BATCH_SIZE} (see SERVE_BATCH_SIZE)"
    )
    profile = WorkerProfile(
        **coefficients,
        max_batch_size=SERVE_BATCH_SIZE,
        max_num_tokens=MAX_NUM_TOKENS,
        kv_capacity_tokens=kv_capacity,
        startup_s=round(startup, 2),
        max_seq_len=cal.engine.max_seq_len,
        source=source,
        fit={
            **quality,
            "repeats": args.repeats,
            "measured": [
                [p.kind, p.prefill_tokens, p.decode_batch, round(p.kv_tokens), p.step_s]
                for p in points
            ],
        },
    )
    args.out.write_text(json.dumps(profile.to_dict(), indent=2) + "\n", encoding="utf-8")
    print(f"{'kind':8} {'prefill':>7} {'batch':>5} {'kv':>7} {'median ms':>9} {'model ms':>9}")
    for p in points:
        model = profile.step_s(p.prefill_tokens, p.decode_batch, p.kv_tokens, p.padded_pairs)
        print(
            f"{p.kind:8} {p.prefill_tokens:7d} {p.decode_batch:5d} {p.kv_tokens:7.0f} "
            f"{p.step_s * 1e3:9.2f} {model * 1e3:9.2f}"
        )
    print(json.dumps({**coefficients, **quality, "startup_s": startup, "kv": kv_capacity}))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
