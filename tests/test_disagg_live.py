"""Disaggregated serving live, with real worker processes:

- `bisllm serve --disaggregated` (1P:1D and 1P:2D units on the embedded model, 1P:2D on a
  tiny random DeepSeek-V3 with MLA latent K/V), and standalone `--role prefill` / `--role
  decode` DeepSeek-V3 workers behind a `--role router`: greedy outputs are token-identical to
  one engine prefilling and decoding itself, long prompts really went through a transfer and
  short ones stayed local.
- Faults, between a decode worker and its prefill workers (a proxy in the middle breaks the
  link on purpose): a refused connection, a connection cut mid-body, a corrupted byte, and the
  prefill worker killed mid-transfer. Each ends in a retry on the next prefill worker or a
  local prefill, with the same output, and no K/V page held on either side afterwards.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fault_proxy import Fault, fault_proxy
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import REPO, TINY_CONFIG
from test_router_live import Process, ready_workers, start_serve, wait_until

from bisllm_server.disagg import PREFILL_PEERS_HEADER
from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.router.fleet import free_ports

EMBEDDED = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"
MAX_TOKENS = 16
MODEL = ("model", "model_name")  # workers label series model_name, the router model
# Long enough to be prefilled remotely (over --max-local-prefill-tokens 8), several pages each.
PROMPTS = [
    "The river stone cloud. " * 12 + "Tell me about the maple lantern.",
    "def area(width, height):\n    return width * height\n\n" * 5 + "def volume(",
    "Once upon a time, in a harbor of copper and velvet, " * 4 + "there",
    "Hi",  # short: prefilled on its decode worker
]


def write_config(tmp: Path, checkpoint: Path, *, prefill: int = 1, decode: int = 1) -> Path:
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trt_llm"]["build"]["checkpoint_repository"]["repo"] = str(checkpoint)
    config["llm_config"] = {
        "is_disaggregated": True,
        "b10_disagg_config": {
            "prefill_workers_per_replica": prefill,
            "decode_workers_per_replica": decode,
        },
    }
    path = tmp / f"config-{checkpoint.name}-{prefill}p{decode}d.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def expected_completions(checkpoint: Path, prompts: list[Any]) -> list[str]:
    """One engine prefilling and decoding itself: what aggregated serving answers."""
    engine = LLMEngine(EngineConfig(model=checkpoint, dtype="float32"))
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [out.text for out in engine.generate(prompts, sp)]


def complete(url: str, prompt: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response


def text(response: httpx.Response) -> str:
    return response.json()["choices"][0]["text"]


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, labels other than the model)."""
    body = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in MODEL))
            out[(sample.name, labels)] = sample.value
    return out


def sample(url: str, name: str, **labels: str) -> float:
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def assert_holds_no_pages(url: str) -> None:
    """Idle: nothing running or waiting, and every used page is evictable prefix cache (no
    request, reservation or transfer pins one)."""
    m = metrics(url)
    assert m[("bisllm_num_requests_running", ())] == 0
    assert m[("bisllm_num_requests_waiting", ())] == 0
    assert m[("bisllm_kv_cache_usage", ())] == 0.0


def worker(tmp: Path, config: Path, role: str, name: str) -> Process:
    process = start_serve([str(config), "--role", role, "--dtype", "fp32"], tmp / f"{name}.log")
    wait_until(lambda: httpx.get(process.url + "/health", timeout=5).status_code == 200, 180,
               f"{name} to be healthy")  # fmt: skip
    return process


# -- outputs ---------------------------------------------------------------------------------


# Token-id prompts for the random DeepSeek-V3 (its tokenizer knows few words): three long,
# one short.
ID_PROMPTS = [list(range(5, 45)), [7, 9, 11] * 15, list(range(100, 160, 2)), [3, 4]]


@pytest.mark.parametrize(
    ("model", "decoders"),
    [("embedded", 1), ("embedded", 2), ("deepseek_v3", 2)],
    ids=["embedded-1P1D", "embedded-1P2D", "deepseek_v3-1P2D"],
)
def test_a_disaggregated_unit_answers_like_aggregated_serving(
    tmp_path, checkpoint, model, decoders
):
    path = EMBEDDED if model == "embedded" else checkpoint(model)
    prompts = PROMPTS if model == "embedded" else ID_PROMPTS
    config = write_config(tmp_path, path, prefill=1, decode=decoders)
    serve = start_serve(
        [str(config), "--disaggregated", "--dtype", "fp32", "--max-local-prefill-tokens", "8"],
        tmp_path / "unit.log",
    )
    try:
        workers = ready_workers(serve, 1 + decoders)
        roles = sorted(w["role"] for w in workers)
        assert roles == ["decode"] * decoders + ["prefill"]
        expected = expected_completions(path, prompts)
        responses = [complete(serve.url, p) for p in prompts + prompts[:2]]
        assert [text(r) for r in responses] == expected + expected[:2]
        prefill = next(w["address"] for w in workers if w["role"] == "prefill")
        decoders = {w["address"] for w in workers if w["role"] == "decode"}
        routes = [
            (r.headers["x-bisllm-worker"], r.headers["x-bisllm-prefill-worker"]) for r in responses
        ]
        assert all(d in decoders for d, _ in routes)
        assert [p for _, p in routes[:4]] == [prefill] * 3 + ["local"]
        # A repeated prompt is cached only on the decode worker that decoded it the first
        # time: elsewhere it is prefilled remotely again; there, it may be short enough
        # uncached to be prefilled locally.
        for first, again in zip(routes[:2], routes[4:], strict=True):
            assert again[0] == first[0] or again[1] == prefill
        remote = sum(p == prefill for _, p in routes)
        received = sum(sample(f"http://{d}", "bisllm_kv_transfers_total") for d in decoders)
        assert received == remote
        assert sample(f"http://{prefill}", "bisllm_kv_exported_bytes_total") > 0
        # Disaggregated routing and its pools, on the router's own metrics.
        router = metrics(serve.url)
        assert (
            router[
                ("bisllm_router_disagg_decisions_total", (("mode", "remote"), ("reason", "remote")))
            ]
            == remote
        )
        pools = {labels for name, labels in router if name == "autoscaler_in_flight_tokens"}
        assert pools == {(("pool", "prefill"),), (("pool", "decode"),)}
        for address in [prefill, *decoders]:
            assert_holds_no_pages(f"http://{address}")
    finally:
        serve.stop()


def test_a_1p1d_deepseek_v3_pair_with_mla_behind_a_standalone_router(tmp_path, checkpoint):
    path = checkpoint("deepseek_v3")
    config = write_config(tmp_path, path)
    prompts = ID_PROMPTS
    prefill = worker(tmp_path, config, "prefill", "prefill")
    decode = worker(tmp_path, config, "decode", "decode")
    router = None
    try:
        addresses = [prefill.url.removeprefix("http://"), decode.url.removeprefix("http://")]
        router = start_serve(
            [str(config), "--role", "router", "--workers", ",".join(addresses),
             "--max-local-prefill-tokens", "8"],
            tmp_path / "router.log",
        )  # fmt: skip
        ready_workers(router, 2)
        responses = [complete(router.url, p) for p in prompts]
        assert [text(r) for r in responses] == expected_completions(path, prompts)
        assert [r.headers["x-bisllm-prefill-worker"] for r in responses] == [addresses[0]] * 3 + [
            "local"
        ]
        assert sample(decode.url, "bisllm_kv_transfers_total") == 3
        for process in (prefill, decode):
            assert_holds_no_pages(process.url)
    finally:
        for process in (router, prefill, decode):
            if process is not None:
                process.stop()


# -- faults ----------------------------------------------------------------------------------


@dataclass
class Pair:
    decode: Process
    prefill: Process
    spare: Process  # a second prefill worker, for retries
    expected: dict[str, str]

    def ask(self, prompt: str, peers: list[str]) -> str:
        headers = {PREFILL_PEERS_HEADER: ",".join(peers)}
        return text(complete(self.decode.url, prompt, headers))

    def counter(self, name: str, **labels: str) -> float:
        return sample(self.decode.url, name, **labels)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("disagg-faults")
    config = write_config(tmp, EMBEDDED)
    processes = [worker(tmp, config, role, role) for role in ("decode", "prefill", "prefill")]
    try:
        expected = dict(zip(PROMPTS, expected_completions(EMBEDDED, PROMPTS), strict=True))
        yield Pair(*processes, expected)
    finally:
        for process in processes:
            process.stop()


def port(process: Process) -> int:
    return int(process.url.rsplit(":", 1)[1])


def test_a_clean_pull_through_the_proxy_transfers(pair):
    before = pair.counter("bisllm_kv_transfers_total")
    with fault_proxy(port(pair.prefill)) as proxy:
        assert pair.ask(PROMPTS[0], [proxy.address]) == pair.expected[PROMPTS[0]]
    assert pair.counter("bisllm_kv_transfers_total") == before + 1
    assert_holds_no_pages(pair.decode.url)


def test_a_refused_connection_falls_back_to_local_prefill(pair):
    before = pair.counter("bisllm_kv_local_prefill_fallbacks_total", reason="transfer_failed")
    closed = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    assert pair.ask(PROMPTS[1], [closed]) == pair.expected[PROMPTS[1]]
    assert pair.counter("bisllm_kv_transfer_failures_total", reason="connect") >= 1
    assert (
        pair.counter("bisllm_kv_local_prefill_fallbacks_total", reason="transfer_failed")
        == before + 1
    )
    assert_holds_no_pages(pair.decode.url)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(Fault("cut", at=3000), "connection_lost"), (Fault("flip", at=6000), "integrity")],
    ids=["cut-mid-body", "corrupted-byte"],
)
def test_a_broken_or_corrupted_transfer_is_retried_on_the_next_prefill_worker(pair, fault, reason):
    failures = pair.counter("bisllm_kv_transfer_failures_total", reason=reason)
    transfers = pair.counter("bisllm_kv_transfers_total")
    with fault_proxy(port(pair.prefill)) as proxy:
        proxy.fault = fault
        spare = pair.spare.url.removeprefix("http://")
        assert pair.ask(PROMPTS[2], [proxy.address, spare]) == pair.expected[PROMPTS[2]]
        assert fault.reached.is_set()  # the fault really happened, mid-body
    assert pair.counter("bisllm_kv_transfer_failures_total", reason=reason) == failures + 1
    assert pair.counter("bisllm_kv_transfers_total") == transfers + 1  # from the spare
    for process in (pair.decode, pair.prefill, pair.spare):
        assert_holds_no_pages(process.url)


def test_killing_the_prefill_worker_mid_transfer_ends_in_a_local_prefill(pair, tmp_path):
    config = write_config(tmp_path, EMBEDDED)
    doomed = worker(tmp_path, config, "prefill", "doomed")
    fallbacks = pair.counter("bisllm_kv_local_prefill_fallbacks_total", reason="transfer_failed")
    try:
        with fault_proxy(port(doomed)) as proxy:
            # The proxy forwards the answer's first 3000 bytes, then waits: the worker is
            # killed there, and nothing it sent after that point arrives.
            fault = proxy.fault = Fault("hold", at=3000)

            def kill_when_reached() -> None:
                fault.reached.wait(120)
                doomed.stop(signal.SIGKILL)
                fault.release.set()

            killer = threading.Thread(target=kill_when_reached)
            killer.start()
            answer = pair.ask(PROMPTS[0], [proxy.address])
            killer.join()
        assert fault.reached.is_set() and doomed.proc.returncode == -signal.SIGKILL
        assert answer == pair.expected[PROMPTS[0]]
        assert (
            pair.counter("bisllm_kv_local_prefill_fallbacks_total", reason="transfer_failed")
            == fallbacks + 1
        )
        assert_holds_no_pages(pair.decode.url)
    finally:
        doomed.stop(signal.SIGKILL)


def test_a_client_leaving_while_its_kv_is_on_the_way_gives_the_reservation_back(pair):
    with fault_proxy(port(pair.prefill)) as proxy:
        fault = proxy.fault = Fault("hold", at=0)  # the answer is held before its first byte
        body = {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "stream": True}
        headers = {PREFILL_PEERS_HEADER: proxy.address}
        with httpx.stream(
            "POST", pair.decode.url + "/v1/completions", json=body, headers=headers, timeout=60
        ) as response:
            assert response.status_code == 200
            assert fault.reached.wait(60)  # the decode worker is waiting on the transfer
            pinned = sample(pair.decode.url, "bisllm_kv_cache_usage")
            assert pinned > 0  # its reserved pages
        # The client is gone: the wait is cancelled and the pages are given back.
        wait_until(
            lambda: sample(pair.decode.url, "bisllm_kv_cache_usage") == 0.0,
            60,
            "the reservation to be released",
        )
        fault.release.set()
    assert_holds_no_pages(pair.decode.url)
    assert_holds_no_pages(pair.prefill.url)
