"""Serving a parallel replica: the ranks' engines kept in lockstep (engine/parallel/lockstep.py),
and `bisllm serve` starting them (openai/ranks.py), on this CPU with gloo.

- In process: a tensor-parallel leader and follower over 2 ranks, fed requests that arrive at
  different steps, random unseeded sampling, a logits processor (a closure that could not
  travel), stop strings, an abort and n-gram speculation. The follower ends every request
  exactly as the leader does; a follower that drifts stops with LockstepError.
- Live, real processes: `bisllm serve` on a TP=2 config answers with the single-process
  engine's tokens and stops cleanly; a DP-attention config serves one worker per rank, which
  a router sees as separate KV targets (with a local router, or `--no-router` behind a
  standalone one); and a replica spanning two "nodes" (two `bisllm serve` processes meeting
  over loopback, as the pods of a LeaderWorkerSet do).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
import torch.distributed as dist
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import REPO, TINY_CONFIG
from test_disagg_live import PROMPTS as DISAGG_PROMPTS
from test_disagg_live import assert_holds_no_pages, expected_completions, sample
from test_disagg_live import complete as disagg_complete
from test_engine_correctness import assert_no_leaked_pages
from test_kv_handoff import decode, prefill, run_to_end
from test_router_live import Process, ready_workers, wait_until

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.kv_handoff import KVHandoff
from bisllm_server.engine.parallel.launch import LaunchError, spawn_local
from bisllm_server.engine.parallel.lockstep import (
    INLINE_BYTES,
    StepFollower,
    StepInputs,
    StepLeader,
)
from bisllm_server.engine.parallel.state import ParallelConfig, ParallelState
from bisllm_server.engine.parallel.tensor_parallel import (
    TensorParallelError,
    engine_group,
    kv_head_range,
)
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.router.fleet import free_ports
from bisllm_truss.cli import main

CHECKPOINT = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
MAX_TOKENS = 12
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a quiet harbor, there lived",
]


def engine_config(**overrides: Any) -> EngineConfig:
    return EngineConfig(model=CHECKPOINT, dtype="float32", num_kv_pages=256, **overrides)


# -- the lockstep protocol, in process ----------------------------------------------------------


BANNED = frozenset(range(100, 600))  # what the logits processor request may never produce


def ban(token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    logits[sorted(BANNED)] = float("-inf")
    return logits


def lockstep_requests() -> list[tuple[int, str, str, SamplingParams]]:
    """(step to add it at, request id, prompt, params): a mix that exercises every choice."""
    return [
        (0, "greedy", PROMPTS[0], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)),
        (0, "random", PROMPTS[1], SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9)),
        (
            2,
            "processed",
            PROMPTS[2],
            # A closure: it cannot be pickled, so only the leader may apply it.
            SamplingParams(
                max_tokens=12, temperature=0.8, logits_processors=[lambda t, x: ban(t, x)]
            ),
        ),
        (3, "stopped", PROMPTS[0], SamplingParams(max_tokens=16, temperature=0, stop=["."])),
        (3, "aborted", PROMPTS[1], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)),
        # Repeats itself: n-gram drafts get proposed and verified.
        (4, "echo", "ab ab ab ab ab ab ab ab", SamplingParams(max_tokens=16, temperature=0)),
    ]


def _lockstep_rank(state: ParallelState, drift: bool) -> dict[str, Any]:
    control = dist.new_group([0, 1], backend="gloo")
    tp = engine_group(state)
    config = engine_config(speculative_method="ngram", num_draft_tokens=3)
    if state.layout.rank == 1:
        llm = LLMEngine(config, tp=tp, lockstep=StepFollower(control, 0))
        if drift:
            llm._totals["generation"] += 1  # as if it had appended a token the leader did not
        return collect(llm, llm.step)
    leader = StepLeader(control, 0)
    llm = LLMEngine(config, tp=tp, lockstep=leader)
    pending = lockstep_requests()
    step = 0

    def lead() -> list[Any]:
        nonlocal step
        for _, rid, prompt, params in [p for p in pending if p[0] == step]:
            llm.add_request(prompt, params, request_id=rid)
        if step == 6:
            llm.abort("aborted")
        step += 1
        return llm.step()

    results = collect(llm, lead, until=lambda: step > 4 and not llm.has_unfinished_requests())
    leader.publish_inputs(StepInputs(digest=(), stop=True))
    return results


def collect(llm: LLMEngine, step: Any, until: Any = None) -> dict[str, Any]:
    tokens: dict[str, list[int]] = {}
    finished: dict[str, tuple[str | None, Any]] = {}
    text: dict[str, str] = {}
    while not (until() if until else llm.lockstep_stopped):
        for out in step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            text[out.request_id] = text.get(out.request_id, "") + out.new_text
            if out.finished:
                finished[out.request_id] = (out.finish_reason, out.stop_reason)
    spec = llm._spec
    return {"tokens": tokens, "finished": finished, "text": text, "spec": dict(spec)}


def test_a_follower_ends_every_request_as_its_leader_does():
    """Requests arriving mid-run, random sampling without a seed, a logits processor only the
    leader has, a stop string, an abort and n-gram drafts: the follower, which never samples,
    produces the leader's tokens, text and finish reasons, and the greedy request has the
    single-process engine's tokens."""
    leader, follower = spawn_local(
        _lockstep_rank, ParallelConfig(tp_size=2), args=(False,), timeout_s=240
    )
    assert follower == leader
    assert set(leader["finished"]) == {r[1] for r in lockstep_requests()}
    assert leader["finished"]["aborted"][0] == "abort"
    assert leader["finished"]["stopped"] == ("stop", ".")
    assert not BANNED & set(leader["tokens"]["processed"])
    assert leader["spec"]["drafted"] > 0  # the verify path ran, in lockstep too
    single = LLMEngine(engine_config())
    (expected,) = single.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    )
    assert leader["tokens"]["greedy"] == expected.token_ids


def _channel_rank(state: ParallelState) -> list[Any]:
    control = dist.new_group([0, 1], backend="gloo")
    messages = [
        StepInputs(digest=(1, 2, 3)),  # a decode step's: one broadcast
        StepInputs(digest=(4,), inbox=[("abort", "x" * (INLINE_BYTES + 1))]),  # two
        {"kv": torch.arange(100_000, dtype=torch.float32)},  # a handoff's tensor
    ]
    if state.layout.rank == 0:
        leader = StepLeader(control, 0)
        return [leader._broadcast(m) for m in messages]
    follower = StepFollower(control, 0)
    return [follower._broadcast() for _ in messages]


def test_step_messages_small_and_large_reach_the_follower_whole():
    sent, received = spawn_local(_channel_rank, ParallelConfig(tp_size=2), timeout_s=120)
    assert received[:2] == sent[:2]
    assert torch.equal(received[2]["kv"], sent[2]["kv"])


def test_a_follower_that_drifts_stops_instead_of_computing_garbage():
    with pytest.raises(LaunchError) as failure:
        spawn_local(
            _lockstep_rank,
            ParallelConfig(tp_size=2),
            args=(True,),
            timeout_s=240,
            dist_timeout_s=60,
        )
    assert failure.value.rank == 1
    assert "diverged from its leader before step 0" in str(failure.value)


# -- K/V handoff between tensor-parallel engines, in process ------------------------------------


HANDOFF_PROMPTS = [list(range(5, 45)), [7, 9, 11] * 15, list(range(100, 160, 2))]
HANDOFF_SAMPLING = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def handoff_config(path: Path) -> EngineConfig:
    return EngineConfig(model=path, dtype="float32", page_size=4, max_batch_size=8)


def _handoff_rank(state: ParallelState, path: Path, handoffs: list[KVHandoff]) -> dict[str, Any]:
    """One rank of a TP=2 pair: prefill and export the prompts (its K/V gathered over the
    ranks), then decode them from a one-rank engine's handoffs (each rank keeping its heads)."""
    torch.set_num_threads(1)
    llm = LLMEngine(handoff_config(path), tp=engine_group(state))
    exported = prefill(llm, HANDOFF_PROMPTS)
    rids = []
    for i, (prompt, kv) in enumerate(zip(HANDOFF_PROMPTS, handoffs, strict=True)):
        assert llm.reserve_kv(f"d{i}", prompt) is not None
        rids.append(llm.add_request(prompt, HANDOFF_SAMPLING, kv=kv, request_id=f"d{i}"))
    tokens = run_to_end([llm], rids)
    assert_no_leaked_pages(llm)
    return {"kv": [h.data.cpu() for h in exported], "tokens": tokens}


@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen3_moe_mqa", "deepseek_v3"])
def test_tensor_parallel_engines_hand_off_every_kv_head(variant, checkpoint):
    """A handoff carries every KV head whatever the sender's TP size: a TP=2 prefill exports
    what a one-rank engine exports (heads gathered over the ranks; one shared KV head or
    MLA's latent cache as is), and a TP=2 decode continues a one-rank engine's handoff with
    its tokens (each rank writing its own heads)."""
    path = checkpoint(variant)
    single = LLMEngine(handoff_config(path))
    handoffs = prefill(single, HANDOFF_PROMPTS)
    expected = decode(
        [LLMEngine(handoff_config(path))],
        HANDOFF_PROMPTS,
        [HANDOFF_SAMPLING] * len(HANDOFF_PROMPTS),
        handoffs,
    )
    ranks = spawn_local(
        _handoff_rank, ParallelConfig(tp_size=2), args=(path, handoffs), timeout_s=240
    )
    for rank in ranks:
        for got, want in zip(rank["kv"], handoffs, strict=True):
            assert got.shape == want.data.shape
            torch.testing.assert_close(got, want.data.cpu(), atol=1e-4, rtol=1e-4)
        assert rank["tokens"] == expected


def test_kv_head_ranges_match_the_attention_shards():
    assert [kv_head_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # Fewer KV heads than ranks: each rank caches the head its query heads read.
    assert [kv_head_range(2, 8, r) for r in range(8)] == [(0, 1)] * 4 + [(1, 1)] * 4
    with pytest.raises(TensorParallelError, match="num_key_value_heads = 3"):
        kv_head_range(3, 2, 0)


# -- bisllm serve, live --------------------------------------------------------------------------


def write_config(tmp: Path, name: str, **parallel: Any) -> Path:
    """The embedded model's config with tensor_parallel_size 2 and `parallel`'s llm_config
    (CPU), or with `nodes` GPU nodes of one GPU each (served with --device cpu)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trt_llm"]["build"]["checkpoint_repository"]["repo"] = str(CHECKPOINT)
    config["trt_llm"]["runtime"]["tensor_parallel_size"] = 2
    nodes = parallel.pop("nodes", 1)
    if nodes > 1:
        config["resources"] = {"accelerator": "H100:1", "use_gpu": True, "node_count": nodes}
    if parallel:
        config["llm_config"] = parallel
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(config: Path, log: Path, *args: str, port: int | None = None) -> Process:
    port = port or free_ports(1)[0]
    out = open(log, "wb")  # noqa: SIM115 - the child writes it until it exits
    proc = subprocess.Popen(
        [sys.executable, "-m", "bisllm_truss.cli", "serve", str(config), "--dtype", "fp32",
         "--port", str(port), "--log-level", "warning", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    out.close()
    return Process(proc, f"http://127.0.0.1:{port}", log)


def healthy(process: Process, url: str | None = None) -> None:
    def check() -> bool:
        if process.proc.poll() is not None:
            raise AssertionError(f"serve exited: {process.log.read_text()[-3000:]}")
        try:
            return httpx.get((url or process.url) + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(check, 180, f"{url or process.url} to be healthy")


def complete(url: str, prompt: str) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def text(response: httpx.Response) -> str:
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def expected() -> dict[str, str]:
    """One process, one engine: what every parallel form must answer."""
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    outs = LLMEngine(engine_config()).generate(PROMPTS, sp)
    return {prompt: out.text for prompt, out in zip(PROMPTS, outs, strict=True)}


def rank_processes(process: Process) -> list[psutil.Process]:
    return psutil.Process(process.proc.pid).children(recursive=True)


def stop_cleanly(process: Process) -> None:
    """SIGTERM: the replica shuts down gracefully, exits 0 and leaves no rank behind."""
    ranks = rank_processes(process)
    assert ranks, "no rank processes"
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(60) == 0, process.log.read_text()[-3000:]
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_a_tensor_parallel_replica_serves_the_single_process_tokens(tmp_path, expected):
    """`bisllm serve` on tensor_parallel_size 2: rank 0 serves, rank 1 follows. Concurrent
    requests get the single-process tokens; a client leaving mid-stream aborts its request on
    both ranks (a follower that missed it would fail the next step's digest check)."""
    process = serve(write_config(tmp_path, "tp2"), tmp_path / "tp2.log")
    try:
        healthy(process)
        assert len(rank_processes(process)) >= 2
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: text(complete(process.url, p)), PROMPTS))
        assert answers == [expected[p] for p in PROMPTS]
        body = {"prompt": PROMPTS[1], "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", process.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one chunk, then hang up
        assert text(complete(process.url, PROMPTS[0])) == expected[PROMPTS[0]]
        assert httpx.get(process.url + "/health", timeout=5).json()["status"] == "ok"
        running = httpx.get(process.url + "/metrics", timeout=5).text
        assert "bisllm_num_requests_running{" in running
    finally:
        if process.proc.poll() is None:
            stop_cleanly(process)
    assert process.proc.returncode == 0


def route(url: str, prompt: str) -> tuple[str, str]:
    response = complete(url, prompt)
    return response.headers["x-bisllm-worker"], text(response)


def test_dp_attention_ranks_are_separate_kv_targets_of_a_standalone_router(tmp_path, expected):
    """enable_attention_dp with expert parallelism, `--no-router`: each rank serves its own
    port (PORT, PORT + 1), and a router listing both routes to each by its own KV cache: a
    repeated long prompt returns to the rank that cached it, and both ranks serve."""
    config = write_config(tmp_path, "dp2", enable_attention_dp=True, expert_parallel_size=2)
    port = free_ports(1)[0]
    ranks = serve(config, tmp_path / "ranks.log", "--no-router", port=port)
    router = None
    try:
        addresses = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
        for address in addresses:
            healthy(ranks, f"http://{address}")
        router = serve(
            config, tmp_path / "router.log", "--role", "router", "--workers", ",".join(addresses)
        )
        workers = ready_workers(router, 2)
        assert sorted(w["address"] for w in workers) == sorted(addresses)
        long_prompts = [f"{p} " * 6 for p in PROMPTS]
        first = [route(router.url, p) for p in long_prompts]
        again = [route(router.url, p) for p in long_prompts]
        assert [w for w, _ in again] == [w for w, _ in first]  # back to the rank with the cache
        assert {w for w, _ in first} == set(addresses)  # load spreads over both ranks
        assert [t for _, t in again] == [t for _, t in first]
        for prompt in PROMPTS:
            assert route(router.url, prompt)[1] == expected[prompt]
        # The pod's one scrape target (port PORT) reports both ranks, each under its label.
        node = httpx.get(f"http://{addresses[0]}/metrics/node", timeout=10).text
        served: dict[str, float] = {}
        for family in text_string_to_metric_families(node):
            for s in family.samples:
                if s.name == "bisllm_requests_total":
                    served[s.labels["rank"]] = served.get(s.labels["rank"], 0) + s.value
        assert set(served) == {"0", "1"} and min(served.values()) > 0
        own = httpx.get(f"http://{addresses[1]}/metrics", timeout=10).text
        assert 'rank="1"' not in own  # a rank's own page stays unlabelled
    finally:
        if router is not None:
            router.stop()
        if ranks.proc.poll() is None:
            stop_cleanly(ranks)
    assert ranks.proc.returncode == 0


def test_dp_attention_on_one_machine_puts_the_router_in_front_of_its_ranks(tmp_path, expected):
    config = write_config(tmp_path, "dp2-local", enable_attention_dp=True)
    process = serve(config, tmp_path / "dp.log")
    try:
        ready_workers(process, 2)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: text(complete(process.url, p)), PROMPTS))
        assert answers == [expected[p] for p in PROMPTS]
    finally:
        if process.proc.poll() is None:
            stop_cleanly(process)
    assert process.proc.returncode == 0


def test_a_replica_spanning_two_nodes_serves_from_node_zero(tmp_path, expected):
    """node_count 2 (one GPU each; run on CPU here): two `bisllm serve` processes with
    --nnodes/--node-rank/--master-addr/--master-port, as the LeaderWorkerSet's pods run them.
    Node 0's rank serves; stopping it stops node 1 too."""
    config = write_config(tmp_path, "two-nodes", nodes=2)
    master = free_ports(1)[0]
    node_args = ["--device", "cpu", "--nnodes", "2", "--master-addr", "127.0.0.1"]
    node_args += ["--master-port", str(master)]
    nodes = [
        serve(config, tmp_path / f"node{n}.log", *node_args, "--node-rank", str(n)) for n in (0, 1)
    ]
    try:
        healthy(nodes[0])
        assert text(complete(nodes[0].url, PROMPTS[2])) == expected[PROMPTS[2]]
        with pytest.raises(httpx.TransportError):
            httpx.get(nodes[1].url + "/health", timeout=2)  # a follower node serves nothing
        nodes[0].proc.send_signal(signal.SIGTERM)
        assert nodes[0].proc.wait(60) == 0, nodes[0].log.read_text()[-3000:]
        assert nodes[1].proc.wait(60) == 0, nodes[1].log.read_text()[-3000:]
    finally:
        for node in nodes:
            node.stop()


def test_a_disaggregated_unit_of_tensor_parallel_workers(tmp_path):
    """`--disaggregated` with tensor_parallel_size 2: a prefill and a decode worker, each two
    ranks. The decode leader's page reservation happens on its follower too, the prefill
    side's heads are gathered for the handoff and each decode rank keeps its own: long
    prompts go remote and answer as one engine does, and no page stays pinned."""
    config = write_config(
        tmp_path,
        "tp2-disagg",
        is_disaggregated=True,
        b10_disagg_config={"prefill_workers_per_replica": 1, "decode_workers_per_replica": 1},
    )
    process = serve(
        config, tmp_path / "unit.log", "--disaggregated", "--max-local-prefill-tokens", "8"
    )
    try:
        workers = {w["role"]: w["address"] for w in ready_workers(process, 2)}
        long_prompts = DISAGG_PROMPTS[:3]
        responses = [disagg_complete(process.url, p) for p in long_prompts]
        assert [text(r) for r in responses] == expected_completions(CHECKPOINT, long_prompts)
        assert {r.headers["x-bisllm-prefill-worker"] for r in responses} == {workers["prefill"]}
        decode_url, prefill_url = (f"http://{workers[r]}" for r in ("decode", "prefill"))
        assert sample(decode_url, "bisllm_kv_transfers_total") == len(long_prompts)
        assert sample(prefill_url, "bisllm_kv_exported_bytes_total") > 0
        for url in (decode_url, prefill_url):
            assert_holds_no_pages(url)
        ranks = rank_processes(process)
    finally:
        process.stop()  # a local unit's router exits as uvicorn does: by the signal
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, [p.pid for p in alive]


def test_serve_refuses_what_a_parallel_replica_cannot_do(tmp_path):
    config = write_config(
        tmp_path,
        "dp2-bad",
        enable_attention_dp=True,
        is_disaggregated=True,
        b10_disagg_config={"prefill_workers_per_replica": 1, "decode_workers_per_replica": 1},
    )
    cases = [
        (["--workers", "2"], "--workers with enable_attention_dp"),
        (["--nnodes", "2", "--master-addr", "127.0.0.1"], "NNODES 2 does not match"),
        (["--role", "prefill"], "--role prefill with enable_attention_dp needs --no-router"),
        (["--disaggregated"], "--disaggregated with enable_attention_dp"),
    ]
    for args, message in cases:
        # Refused before anything loads or starts.
        result = CliRunner().invoke(main, ["serve", str(config), *args])
        assert result.exit_code != 0
        assert message in result.output, result.output
