"""The router process against scripted workers: byte-for-byte relaying, failover before the
first token, a clean in-band error after it, queueing, draining, keys, and the KV event link
(replay after a lost line, resync after an impossible event, snapshots)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from router_fakes import BODY, STREAM, USAGE, FakeWorker, fake_workers
from server_fixtures import serve_app

from bisllm_server.kv_events import BlockRemoved, BlockStored, hash_token_blocks
from bisllm_server.router import snapshot
from bisllm_server.router.app import create_router_app
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.prompts import PromptTokenizer
from bisllm_server.router.service import RouterOptions, RouterService

PROMPT = list(range(10, 30))  # 5 blocks of 4


def wait_until(check, timeout: float = 20.0, what: str = "condition") -> Any:  # type: ignore[no-untyped-def]
    """Poll `check` until truthy: waiting for another process's state, not a fixed delay."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_router(
    workers: list[FakeWorker], api_key: str | None = None, **knobs: Any
) -> Iterator[tuple[str, RouterService]]:
    options = RouterOptions(
        workers=",".join(w.url.removeprefix("http://") for w in workers),
        served_model_name="fake",
        api_key=api_key,
        snapshot_path=knobs.pop("snapshot_path", None),
        heartbeat_timeout_s=2.0,
        health_interval_s=0.2,
    )
    service = RouterService(RouterConfig(**knobs), options, PromptTokenizer(None))
    with serve_app(create_router_app(service)) as url:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        wait_until(
            lambda: httpx.get(f"{url}/health").json()["workers_ready"] == len(workers),
            what="workers ready",
        )
        yield url, service
        del headers


def address(worker: FakeWorker) -> str:
    return worker.url.removeprefix("http://")


def complete(url: str, *, stream: bool, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": "fake", "prompt": PROMPT, "max_tokens": 3, "stream": stream}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)


def test_streams_and_bodies_pass_through_byte_for_byte() -> None:
    with fake_workers("a") as (worker,), running_router([worker]) as (url, _):
        raw = json.dumps({"prompt": PROMPT, "max_tokens": 3, "stream": True, "x_extra": 1})
        streamed = httpx.post(
            f"{url}/v1/completions",
            content=raw,
            headers={"content-type": "application/json", "x-request-id": "abc"},
        )
        assert streamed.status_code == 200
        assert streamed.content == b"".join(STREAM)  # the usage chunk and [DONE] included
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.headers["x-bisllm-worker"] == address(worker)
        # The worker got the client's body and request id untouched.
        sent, sent_headers = worker.requests[-1]
        assert sent == raw.encode() and sent_headers["x-request-id"] == "abc"
        plain = complete(url, stream=False)
        assert plain.content == BODY and plain.json()["usage"] == USAGE


def test_a_worker_failing_before_the_first_token_is_retried_elsewhere() -> None:
    with fake_workers("a", "b", "c") as workers:
        bad503, dies, good = workers
        bad503.mode, dies.mode = "503", "die_before_output"
        with running_router(workers, policy="round_robin") as (url, service):
            # Which worker round-robin starts from depends on the order their event streams
            # connected, so send requests until both failing workers have been tried (each
            # is tried within a few rounds), every one answered by the good worker.
            for _ in range(12):
                response = complete(url, stream=True)
                assert response.content == b"".join(STREAM)
                assert response.headers["x-bisllm-worker"] == address(good)
                if bad503.requests and dies.requests:
                    break
            assert bad503.requests and dies.requests, "round-robin never tried a failing worker"
            assert service.metrics.totals["retries"] >= 2
            # The worker whose connection broke is out of rotation until its health check
            # passes again; the one that said 503 stays in.
            assert httpx.get(f"{url}/router/stats").json()["totals"]["retries"] >= 2


def test_a_worker_failing_after_the_first_token_ends_the_stream_cleanly() -> None:
    with fake_workers("a") as (worker,), running_router([worker]) as (url, service):
        worker.mode = "die_after_output"
        response = complete(url, stream=True)
        assert response.status_code == 200
        assert response.content.startswith(b"".join(STREAM[:3]))
        events = [e for e in response.content.split(b"\n\n") if e]
        error = json.loads(events[-2].removeprefix(b"data: "))
        assert error["error"]["code"] == "worker_lost"
        assert events[-1] == b"data: [DONE]"
        assert service.metrics.totals["retries"] == 0


def test_every_worker_failing_is_a_503() -> None:
    with fake_workers("a", "b") as workers:
        for worker in workers:
            worker.mode = "503"
        with running_router(workers) as (url, _):
            response = complete(url, stream=False)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "workers_failed"


def test_requests_queue_while_every_worker_is_saturated() -> None:
    with fake_workers("a") as (worker,):
        worker.mode = "hold"
        # Saturated past 1 uncached prompt token per max_num_tokens (2048 by default): any
        # request whose prefill has not produced a token yet.
        with running_router([worker], router_queue_threshold=0.000001) as (url, service):
            bodies: dict[str, bytes] = {}

            def send(name: str) -> None:
                bodies[name] = complete(url, stream=True).content

            first = threading.Thread(target=send, args=("first",))
            first.start()
            wait_until(lambda: len(worker.requests) == 1, what="the first request")
            second = threading.Thread(target=send, args=("second",))
            second.start()
            wait_until(lambda: service.router.queue_depth == 1, what="a queued request")
            assert len(worker.requests) == 1  # held back by the router, not by the worker
            worker.release.set()
            first.join(30)
            second.join(30)
            assert bodies == {"first": b"".join(STREAM), "second": b"".join(STREAM)}
            assert len(worker.requests) == 2 and service.router.queue_depth == 0


def test_drained_workers_get_no_new_requests_and_keys_are_checked() -> None:
    with fake_workers("a", "b") as workers:
        key = {"Authorization": "Bearer sesame"}
        with running_router(workers, api_key="sesame") as (url, _):
            assert complete(url, stream=False).status_code == 401
            drained = address(workers[0])
            ok = httpx.post(f"{url}/router/workers/{drained}/drain", headers=key)
            assert ok.status_code == 200
            for _ in range(4):
                response = complete(url, stream=False, headers=key)
                assert response.headers["x-bisllm-worker"] == address(workers[1])
            # The worker heard the router's key.
            assert workers[1].requests[-1][1]["authorization"] == "Bearer sesame"
            missing = httpx.post(f"{url}/router/workers/nobody:1/drain", headers=key)
            assert missing.status_code == 404
            httpx.post(f"{url}/router/workers/{drained}/undrain", headers=key).raise_for_status()
            workers_state = httpx.get(f"{url}/router/workers", headers=key).json()["workers"]
            assert {w["status"] for w in workers_state} == {"ready"}


def stored(tokens: list[int], parent: list[int] | None = None) -> BlockStored:
    prefix = parent or []
    ids = hash_token_blocks(prefix + tokens, 4)
    return BlockStored(ids[len(prefix) // 4 :], ids[len(prefix) // 4 - 1] if prefix else None,
                       tokens, 4)  # fmt: skip


def test_kv_events_keep_the_index_in_step_through_gaps_and_resyncs(tmp_path: Path) -> None:
    with fake_workers("a") as (worker,):
        path = tmp_path / "index.json.gz"
        with running_router([worker], snapshot_path=path) as (url, service):
            name = address(worker)
            link = service.links[name]
            ids = hash_token_blocks(PROMPT, 4)
            worker.publisher.publish(stored(PROMPT[:8]))
            wait_until(lambda: service.router.index.num_blocks(name) == 2, what="2 blocks")

            # A line lost in transport: the next id skips one, the link reconnects from its
            # last id and the worker replays the missing event.
            handle = link._handle
            dropped: list[dict[str, Any]] = []

            def lossy(message: dict[str, Any]) -> None:
                if message.get("type") == "event" and not dropped:
                    dropped.append(message)
                    return
                handle(message)

            link._handle = lossy  # type: ignore[method-assign]
            worker.publisher.publish(stored(PROMPT[8:12], PROMPT[:8]))
            worker.publisher.publish(stored(PROMPT[12:16], PROMPT[:12]))
            wait_until(lambda: link.state.gaps == 1, what="the gap")
            wait_until(lambda: service.router.index.num_blocks(name) == 4, what="the replay")
            assert link.state.snapshots == 1  # only the first connection's
            assert service.router.index.overlaps(ids)[name] == 4

            # An event that cannot follow from the index (its parent is missing) means the
            # index is wrong: the link asks for a snapshot.
            link._handle = handle  # type: ignore[method-assign]
            service.router.index.apply(name, BlockRemoved(ids[2:4]))
            worker.publisher.publish(stored(PROMPT[16:20], PROMPT[:16]))
            wait_until(lambda: link.state.snapshots == 2, what="a resync")
            wait_until(lambda: service.router.index.num_blocks(name) == 5, what="5 blocks")
            assert service.router.index.overlaps(ids)[name] == 5

            # The index is what the snapshot file holds.
            httpx.post(f"{url}/router/snapshot").raise_for_status()
            saved = snapshot.read(path)[name]
            assert saved.instance == worker.log.instance
            assert saved.last_event_id == worker.log.last_event_id
            assert saved.blocks == service.router.index.blocks(name)


def test_snapshot_files_round_trip_and_reject_garbage(tmp_path: Path) -> None:
    path = tmp_path / "s.json.gz"
    assert snapshot.read(path) == {}
    worker = snapshot.WorkerSnapshot("i", 7, 16, [(1, None), (2, 1)])
    snapshot.write(path, snapshot.encode({"w:1": worker}))
    assert snapshot.read(path) == {"w:1": worker}
    path.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="unreadable"):
        snapshot.read(path)


def test_a_client_that_leaves_gives_back_its_load() -> None:
    with fake_workers("a") as (worker,), running_router([worker]) as (url, service):
        worker.mode = "hold"
        load = service.router.workers[address(worker)].load
        # The router holds the response until the worker's first output; the client gives up
        # first, for a streamed and a plain request.
        for stream in (True, False):
            with pytest.raises(httpx.ReadTimeout):
                body = {"prompt": PROMPT, "max_tokens": 3, "stream": stream}
                httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.5))
            wait_until(lambda: load.active_requests == 0, what="the load to be given back")
        assert load.pending_prefill_tokens == 0 and load.decode_tokens == 0
        worker.release.set()
