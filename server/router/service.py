"""The router process: workers found and followed, requests placed, forwarded and failed over.

A completion request is parsed and tokenized here (to hash its blocks), placed by the `Router`,
and its original body is sent unchanged to the chosen worker; the worker's response comes back
byte for byte. Until the first token arrives nothing has reached the client, so a worker that
fails before then (connection lost, 503) costs only a retry on another worker; after it, the
client gets an in-band error event and a clean end of stream.

When workers announce prefill and decode roles, a request goes to a decode worker, and for a
prompt worth moving the header `x-bisllm-prefill-peers` names the prefill workers it pulls the
prompt's KV from (first preferred, the next a fallback); without it the decode worker prefills
the prompt itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import httpx

from bisllm_server.disagg import PREFILL_PEERS_HEADER
from bisllm_server.kv_events import hash_token_blocks
from bisllm_server.openai.errors import APIError
from bisllm_server.openai.protocol import ChatCompletionRequest, CompletionRequest
from bisllm_server.router import snapshot
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.core import (
    Decision,
    NoWorkerAvailable,
    PairDecision,
    Router,
    RouteRequest,
    WorkerRole,
)
from bisllm_server.router.discovery import parse_workers, resolve_workers
from bisllm_server.router.metrics import RouterMetrics
from bisllm_server.router.prompts import PromptTokenizer
from bisllm_server.router.sse import SSEEvents, carries_output, count_outputs
from bisllm_server.router.worker_link import LinkState, WorkerLink

log = logging.getLogger("bisllm.router")

SESSION_HEADER = "x-session-affinity"
# PREFILL_PEERS_HEADER is set by the router only: a client's own is not forwarded
# (FORWARDED_REQUEST_HEADERS), so clients cannot point decode workers at hosts of their choosing.
# Request headers a worker needs; hop-by-hop and length headers are the transport's business.
FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "x-request-id", "user-agent")
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "content-encoding",
        "date",
        "server",
    }
)


@dataclass
class RouterOptions:
    workers: str  # HOST:PORT[,HOST:PORT...]
    served_model_name: str
    api_key: str | None = None
    strict_model_name: bool = False
    snapshot_path: Path | None = None
    snapshot_interval_s: float = 10.0
    discovery_interval_s: float = 10.0
    max_attempts: int = 3  # workers tried per request before giving up
    heartbeat_timeout_s: float = 3.0
    health_interval_s: float = 1.0


class RouterService:
    def __init__(
        self, config: RouterConfig, options: RouterOptions, prompts: PromptTokenizer
    ) -> None:
        self.config = config
        self.options = options
        # Replaced, never changed in place: `_resync` tells a stale resolution by identity.
        self.targets = parse_workers(options.workers)
        self.router = Router(config)
        self.metrics = RouterMetrics(self.router, options.served_model_name)
        self.prompts = prompts
        if prompts.remote is None:
            prompts.remote = self._tokenize_remotely
        self.links: dict[str, WorkerLink] = {}
        self.client: httpx.AsyncClient | None = None
        self._waiters: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._restored: dict[str, snapshot.WorkerSnapshot] = {}
        self._stopping: set[asyncio.Task] = set()  # links being stopped (kept referenced)
        # Started after the workers are known and stopped first (the autoscaler's planner).
        self.companions: list[Companion] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def worker_headers(self) -> dict[str, str]:
        key = self.options.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0, read=None))
        if self.options.snapshot_path is not None:
            self._restore(self.options.snapshot_path)
        self._sync_workers(resolve_workers(self.targets))
        self._tasks = [asyncio.create_task(self._discover(), name="router discovery")]
        if self.options.snapshot_path is not None:
            self._tasks.append(asyncio.create_task(self._snapshots(), name="router snapshots"))
        for companion in self.companions:
            await companion.start()

    async def stop(self) -> None:
        for companion in reversed(self.companions):
            await companion.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.options.snapshot_path is not None:
            await self.write_snapshot()
        await asyncio.gather(*(link.stop() for link in self.links.values()))
        if self.client is not None:
            await self.client.aclose()

    def _restore(self, path: Path) -> None:
        try:
            saved = snapshot.read(path)
        except ValueError as exc:
            log.warning("%s; starting with an empty index", exc)
            return
        for address, worker in saved.items():
            try:
                self.router.add_worker(address, block_size=worker.block_size)
                self.router.index.replace(address, worker.blocks)
            except ValueError as exc:
                log.warning("snapshot entry for %s dropped: %s", address, exc)
                self.router.remove_worker(address)
                continue
            self.router.set_status(address, "down")  # until its link connects
            self._restored[address] = worker
        if saved:
            log.info("restored the index of %d workers from %s", len(self._restored), path)

    async def _discover(self) -> None:
        while True:
            await asyncio.sleep(self.options.discovery_interval_s)  # a polling period
            await self._resync()

    def _sync_workers(self, addresses: list[str]) -> None:
        assert self.client is not None
        for address in addresses:
            if address in self.links:
                continue
            saved = self._restored.pop(address, None)
            state = LinkState()
            if saved is not None:
                state = LinkState(
                    instance=saved.instance,
                    last_event_id=saved.last_event_id,
                    block_size=saved.block_size,
                    restored=True,
                )
            link = WorkerLink(
                address,
                self.router,
                self.client,
                headers=self.worker_headers,
                heartbeat_timeout=self.options.heartbeat_timeout_s,
                health_interval=self.options.health_interval_s,
                on_change=self._release_queued,
                on_report=self.metrics.worker_report,
                state=state,
            )
            self.links[address] = link
            link.start()
        gone = [a for a in self.links if a not in addresses]
        for address in gone:
            link = self.links.pop(address)
            self._stopping.add(task := asyncio.create_task(link.stop()))
            task.add_done_callback(self._stopping.discard)
            self.router.remove_worker(address)
            log.info("worker %s left", address)

    async def add_worker(self, address: str) -> None:
        """Follow and route to one more worker (HOST:PORT), as if --workers had named it."""
        new = [t for t in parse_workers(address) if t not in self.targets]
        self.targets = self.targets + new
        await self._resync()

    async def remove_worker(self, address: str) -> None:
        """Stop following a worker the router was told about with `add_worker` or --workers."""
        gone = set(parse_workers(address))
        self.targets = [t for t in self.targets if t not in gone]
        await self._resync()

    async def _resync(self) -> None:
        """Follow exactly the workers the targets name now. Resolving happens off the loop, so
        the targets may change meanwhile; an answer for targets that are no longer current is
        dropped (it would undo that change) and the resolution is done again."""
        while True:
            targets = self.targets
            addresses = await asyncio.to_thread(resolve_workers, targets)
            if targets is self.targets:
                self._sync_workers(addresses)
                return

    async def _snapshots(self) -> None:
        while True:
            await asyncio.sleep(self.options.snapshot_interval_s)  # a write period
            await self.write_snapshot()

    async def write_snapshot(self) -> None:
        """Write the index now: taken in one go on the event loop (so each worker's blocks match
        its last event id), encoded and written off it."""
        path = self.options.snapshot_path
        if path is None:
            return
        workers = {
            address: snapshot.WorkerSnapshot(
                link.state.instance,
                link.state.last_event_id,
                link.state.block_size,
                self.router.index.blocks(address),
            )
            for address, link in self.links.items()
            if link.state.instance is not None and link.state.block_size is not None
        }
        payload = await asyncio.to_thread(snapshot.encode, workers)
        await asyncio.to_thread(snapshot.write, path, payload)

    # -- state -------------------------------------------------------------------------------------

    def ready_workers(self) -> list[str]:
        return self.router.candidates()

    def worker_report(self) -> list[dict[str, Any]]:
        report = []
        for address, link in self.links.items():
            info = self.router.workers.get(address)
            s = link.state
            report.append(
                {
                    "address": address,
                    "status": info.status if info else "down",
                    "instance": s.instance,
                    "role": s.role,
                    "last_event_id": s.last_event_id,
                    "index_blocks": self.router.index.num_blocks(address),
                    "restored_from_snapshot": s.restored,
                    "snapshots_received": s.snapshots,
                    "replayed_events": s.replayed_events,
                    "events": s.events,
                    "gaps": s.gaps,
                    "routed": info.routed_total if info else 0,
                    "load": vars(info.load).copy() if info else {},
                    "report": s.report,
                }
            )
        return report

    def drain(self, address: str, drained: bool) -> bool:
        link = self.links.get(address)
        if link is None:
            return False
        link.drain(drained)
        return True

    # -- queueing ------------------------------------------------------------------------------------

    def _release_queued(self) -> None:
        """Load went down or a worker came back: let the next queued request through."""
        while True:
            request = self.router.next_queued()
            if request is None:
                return
            waiter = self._waiters.pop(request.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
                return  # it routes itself, then releases the next one

    async def _wait_for_room(self, request: RouteRequest) -> None:
        """Queue the request while every worker is saturated, until `_release_queued` lets it
        through."""
        if not self.router.must_queue(request):
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[request.request_id] = waiter
        self.router.enqueue(request)
        try:
            await waiter
        finally:
            self._waiters.pop(request.request_id, None)
            self.router.drop_queued(request.request_id)

    def _no_worker(self, exc: NoWorkerAvailable) -> APIError:
        self.metrics.failed("no_worker")
        return APIError(503, str(exc), code="no_worker_available", headers={"Retry-After": "1"})

    async def _place(self, request: RouteRequest) -> Decision:
        await self._wait_for_room(request)
        try:
            decision = self.router.choose(request)
        except NoWorkerAvailable as exc:
            raise self._no_worker(exc) from None
        self.router.start(decision, request)
        self.metrics.decided(decision)
        self._release_queued()
        return decision

    async def _place_pair(self, request: RouteRequest) -> PairDecision:
        """`_place` for disaggregated workers: a decode worker and, maybe, a prefill one."""
        await self._wait_for_room(request)
        try:
            pair = self.router.choose_pair(request)
        except NoWorkerAvailable as exc:
            raise self._no_worker(exc) from None
        self.router.start_pair(pair, request)
        self.metrics.decided(pair.decode)
        self.metrics.disaggregated(pair)
        self._release_queued()
        return pair

    async def _attempt(self, request: RouteRequest, forwarded: dict[str, str]) -> _Attempt:
        """Place one try of a request: where it goes, with which headers."""
        if not self.router.disaggregated:
            decision = await self._place(request)
            return _Attempt(decision, forwarded, _route_headers(decision))
        pair = await self._place_pair(request)
        headers = forwarded
        if pair.prefill_peers:
            headers = {**forwarded, PREFILL_PEERS_HEADER: ",".join(pair.prefill_peers)}
        return _Attempt(pair.decode, headers, _route_headers(pair.decode) | _pair_headers(pair))

    def _finish(self, request_id: str) -> None:
        self.router.finish(request_id)
        self._release_queued()

    # -- requests ------------------------------------------------------------------------------------

    async def _tokenize_remotely(self, body: dict[str, Any]) -> list[int]:
        assert self.client is not None
        for address in self.ready_workers():
            try:
                response = await self.client.post(
                    f"http://{address}/tokenize", json=body, headers=self.worker_headers
                )
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                return list(response.json()["tokens"])
            if response.status_code == 400:
                raise APIError(400, response.json()["error"]["message"])
        raise APIError(503, "no worker could tokenize the prompt", code="no_worker_available")

    async def completion(
        self,
        path: str,
        request: ChatCompletionRequest | CompletionRequest,
        raw_body: bytes,
        headers: dict[str, str],
    ) -> tuple[int, dict[str, str], bytes | AsyncIterator[bytes]]:
        """(status, headers, body or byte stream) for a completion or chat completion."""
        if self.options.strict_model_name and request.model not in (
            None,
            self.options.served_model_name,
        ):
            raise APIError(
                404,
                f"The model `{request.model}` does not exist; this server serves "
                f"`{self.options.served_model_name}`.",
                param="model",
                code="model_not_found",
            )
        if not self.ready_workers():
            self.metrics.failed("no_worker")
            raise APIError(
                503, "no worker is ready", code="no_worker_available", headers={"Retry-After": "1"}
            )
        token_ids = await self.prompts.prompt_ids(request)
        block_size = self.router.block_size or 1
        block_ids = hash_token_blocks(token_ids, block_size)
        request_id = uuid.uuid4().hex
        session = headers.get(SESSION_HEADER)
        forwarded = {k: v for k, v in headers.items() if k in FORWARDED_REQUEST_HEADERS}
        forwarded.update(self.worker_headers)
        failed: set[str] = set()
        last_error = "no worker was tried"
        for attempt in range(self.options.max_attempts):
            route = RouteRequest(request_id, len(token_ids), block_ids, session, frozenset(failed))
            if attempt:
                # Disaggregated, only another decode worker can take the request over.
                role: WorkerRole | None = "decode" if self.router.disaggregated else None
                if not self.router.candidates(route.exclude, role):
                    break
                self.metrics.retried()
            placed = await self._attempt(route, forwarded)
            worker = placed.decision.worker
            lease = _Lease(self, request_id)
            try:
                result = await self._send(path, raw_body, placed, bool(request.stream), lease)
            except _WorkerFailed as exc:
                lease.release()
                failed.add(worker)
                last_error = f"{worker}: {exc}"
                log.warning(
                    "request %s failed on %s before its first token: %s", request_id, worker, exc
                )
                if exc.worker_down and worker in self.links:
                    self.links[worker].mark_failed()
                continue
            except BaseException:  # the client left (cancelled) or a bug: free the worker's load
                lease.release()
                raise
            return result
        self.metrics.failed("workers_failed")
        raise APIError(
            503,
            f"every worker tried failed before answering ({last_error})",
            code="workers_failed",
            headers={"Retry-After": "1"},
        )

    async def _send(
        self,
        path: str,
        raw_body: bytes,
        placed: _Attempt,
        stream: bool,
        lease: _Lease,
    ) -> tuple[int, dict[str, str], bytes | AsyncIterator[bytes]]:
        assert self.client is not None
        rid = placed.decision.request_id
        url = f"http://{placed.decision.worker}{path}"
        try:
            upstream = await self.client.send(
                self.client.build_request("POST", url, content=raw_body, headers=placed.headers),
                stream=True,
            )
        except httpx.TransportError as exc:
            raise _WorkerFailed(repr(exc), worker_down=True) from None
        if upstream.status_code == 503:
            # Overloaded or its engine died: someone else may serve it.
            body = await _read_quietly(upstream)
            raise _WorkerFailed(f"503 {body[:200]!r}", worker_down=False)
        response_headers = {
            k: v for k, v in upstream.headers.items() if k.lower() not in DROPPED_RESPONSE_HEADERS
        }
        response_headers.update(placed.route_headers)
        if not stream or upstream.status_code != 200:
            try:
                body = await upstream.aread()
            except httpx.HTTPError as exc:
                raise _WorkerFailed(repr(exc), worker_down=True) from None
            finally:
                await upstream.aclose()
            lease.release()
            return upstream.status_code, response_headers, body
        events = SSEEvents(upstream.aiter_raw())
        held: list[bytes] = []
        try:
            # Hold events (the role chunk) until one carries output: up to there a retry elsewhere
            # is invisible to the client.
            async for event in events:
                held.append(event)
                if carries_output(event):
                    break
        except httpx.HTTPError as exc:
            await upstream.aclose()
            raise _WorkerFailed(repr(exc), worker_down=True) from None
        if not held or not carries_output(held[-1]):
            # The stream ended without output: whatever it said goes to the client as is.
            await upstream.aclose()
            lease.release()
            return upstream.status_code, response_headers, b"".join(held)
        self.router.first_token(rid)
        lease.upstream = upstream
        relay = self._relay(held, events, upstream, rid, lease)
        return upstream.status_code, response_headers, relay

    async def _relay(
        self,
        held: list[bytes],
        events: SSEEvents,
        upstream: httpx.Response,
        rid: str,
        lease: _Lease,
    ) -> AsyncIterator[bytes]:
        try:
            for event in held:
                yield event
            async for event in events:
                outputs = count_outputs(event)
                if outputs:
                    self.router.tokens(rid, outputs)
                yield event
            if events.trailing:
                yield events.trailing
        except httpx.HTTPError as exc:
            log.warning("worker stream for %s broke after its first token: %r", rid, exc)
            self.metrics.failed("worker_lost_mid_stream")
            error = {
                "error": {
                    "message": "the worker serving this request failed mid-stream; "
                    "retry the request",
                    "type": "server_error",
                    "param": None,
                    "code": "worker_lost",
                }
            }
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            with contextlib.suppress(Exception):
                await upstream.aclose()
            lease.release()

    async def forward_stateless(
        self, method: str, path: str, raw_body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, str]:
        """An endpoint any worker answers the same (/v1/models, /tokenize, /detokenize): the
        first ready worker that answers. (status, body, content type)."""
        assert self.client is not None
        forwarded = {k: v for k, v in (headers or {}).items() if k in FORWARDED_REQUEST_HEADERS}
        forwarded.update(self.worker_headers)
        for address in self.ready_workers():
            try:
                response = await self.client.request(
                    method, f"http://{address}{path}", content=raw_body, headers=forwarded
                )
            except httpx.HTTPError:
                continue
            return (
                response.status_code,
                response.content,
                response.headers.get("content-type", "application/json"),
            )
        raise APIError(503, "no worker is ready", code="no_worker_available")


class Companion(Protocol):
    """A task that lives as long as the router (the autoscaler's planner)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def report(self) -> dict[str, Any]: ...


class _Lease:
    """A routed request's share of its worker's load, given back exactly once: when it ends,
    fails, or its response is dropped without ever being read (a client that left between the
    routing and the first byte; an unstarted generator runs no `finally`)."""

    def __init__(self, service: RouterService, request_id: str) -> None:
        self.service = service
        self.request_id = request_id
        self.upstream: httpx.Response | None = None
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.service._finish(self.request_id)
        upstream = self.upstream
        if upstream is not None and not upstream.is_closed:
            with contextlib.suppress(RuntimeError):  # no running loop: the process is ending
                task = asyncio.get_running_loop().create_task(upstream.aclose())
                self.service._stopping.add(task)
                task.add_done_callback(self.service._stopping.discard)

    def __del__(self) -> None:
        self.release()


class _Attempt(NamedTuple):
    """One try of a request: the worker chosen, the headers it gets, the route headers the
    client gets."""

    decision: Decision
    headers: dict[str, str]
    route_headers: dict[str, str]


class _WorkerFailed(Exception):
    def __init__(self, message: str, *, worker_down: bool) -> None:
        super().__init__(message)
        self.worker_down = worker_down


async def _read_quietly(response: httpx.Response) -> bytes:
    try:
        return await response.aread()
    except httpx.HTTPError:
        return b""
    finally:
        await response.aclose()


def _route_headers(decision: Decision) -> dict[str, str]:
    """Route attribution for the client and its logs (like BIS-LLM's x-baseten-dyn-* headers)."""
    return {
        "x-bisllm-worker": decision.worker,
        "x-bisllm-route-reason": decision.reason,
        "x-bisllm-estimated-cached-tokens": str(decision.estimated_cached_tokens),
    }


def _pair_headers(pair: PairDecision) -> dict[str, str]:
    """Where a disaggregated request's prompt was prefilled, and why there."""
    return {
        "x-bisllm-prefill-worker": pair.prefill.worker if pair.prefill is not None else "local",
        "x-bisllm-disagg-reason": pair.reason,
    }
