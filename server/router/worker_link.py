"""One worker as the router sees it: its KV event stream feeding the index, its load reports and
its health.

Transport: `GET /kv_events?since=ID&instance=ID` on the worker, newline-delimited JSON
(docs/router.md). The first line says who the worker is (`instance`, new per process), its
block size and its role (prefill, decode or both); then either the events after `since` (same
instance, still in the worker's ring) or a snapshot of its whole cache; then live events, each
with the next sequence number, and a `load` line every half second that doubles as the
heartbeat.

Anything that breaks the sequence (a number skipped, an event that does not fit the index)
ends the connection and the link reconnects from the last event it applied; the worker answers
with a replay or, if it no longer has those events, a snapshot. Silence longer than
`heartbeat_timeout` counts as a dead worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bisllm_server.kv_events import event_from_dict
from bisllm_server.router.core import Router
from bisllm_server.router.index import IndexOutOfSync

log = logging.getLogger("bisllm.router")


class StreamBroken(Exception):
    """The event stream skipped a sequence number or sent something unreadable."""


@dataclass
class LinkState:
    """What the router restores from a snapshot and reports at /router/workers."""

    instance: str | None = None
    last_event_id: int = 0
    block_size: int | None = None
    role: str = "both"  # prefill | decode | both (aggregated), from the worker's hello
    connected: bool = False
    healthy: bool = False
    drained: bool = False  # taken out of rotation by an operator
    restored: bool = False  # index loaded from the router's snapshot
    snapshots: int = 0  # full resyncs received from the worker
    replayed_events: int = 0  # events received as a replay after a reconnect
    events: int = 0
    gaps: int = 0
    reconnects: int = 0
    report: dict[str, Any] = field(default_factory=dict)


class WorkerLink:
    def __init__(
        self,
        address: str,
        router: Router,
        client: httpx.AsyncClient,
        *,
        headers: dict[str, str] | None = None,
        heartbeat_timeout: float = 3.0,
        health_interval: float = 1.0,
        on_change: Callable[[], None] = lambda: None,
        on_report: Callable[[str, dict[str, Any], dict[str, Any]], None] = lambda *_: None,
        state: LinkState | None = None,
    ) -> None:
        self.address = address
        self.router = router
        self.client = client
        self.headers = headers or {}
        self.heartbeat_timeout = heartbeat_timeout
        self.health_interval = health_interval
        self.on_change = on_change  # the worker's status or load changed: wake the queue
        self.on_report = on_report  # (address, previous report, new report)
        self.state = state or LinkState()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._replaying = False

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow_events(), name=f"kv-events {self.address}"),
            asyncio.create_task(self._check_health(), name=f"health {self.address}"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- status ----------------------------------------------------------------------------------

    def _update_status(self) -> None:
        info = self.router.workers.get(self.address)
        if info is None:
            return
        s = self.state
        status = (
            "down" if not (s.connected and s.healthy) else ("draining" if s.drained else "ready")
        )
        if info.status != status:
            log.info("worker %s is %s", self.address, status)
            info.status = status
            self.on_change()

    def drain(self, drained: bool) -> None:
        self.state.drained = drained
        self._update_status()

    def mark_failed(self) -> None:
        """A request could not reach the worker: stop routing to it until it answers again."""
        self.state.healthy = False
        self._update_status()

    # -- health ----------------------------------------------------------------------------------

    async def _check_health(self) -> None:
        while not self._stop.is_set():
            try:
                response = await self.client.get(
                    f"{self.base_url}/health", headers=self.headers, timeout=2.0
                )
                healthy = response.status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy != self.state.healthy:
                self.state.healthy = healthy
                self._update_status()
            await self._pause(self.health_interval)

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds` (a retry interval, not synchronisation) unless stopped first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # -- events ----------------------------------------------------------------------------------

    async def _follow_events(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            params: dict[str, Any] = {}
            if self.state.instance is not None:
                params = {"since": self.state.last_event_id, "instance": self.state.instance}
            timeout = httpx.Timeout(5.0, read=self.heartbeat_timeout)
            try:
                async with self.client.stream(
                    "GET",
                    f"{self.base_url}/kv_events",
                    params=params,
                    headers=self.headers,
                    timeout=timeout,
                ) as response:
                    if response.status_code != 200:
                        raise StreamBroken(f"/kv_events answered {response.status_code}")
                    backoff = 0.1
                    self._replaying = True
                    async for line in response.aiter_lines():
                        if line:
                            self._handle(json.loads(line))
            except (httpx.HTTPError, StreamBroken, IndexOutOfSync, ValueError, KeyError) as exc:
                if isinstance(exc, IndexOutOfSync):
                    # Our picture of the worker is wrong: ask for a snapshot.
                    self.state.instance = None
                    log.warning("worker %s out of sync (%s); resyncing", self.address, exc)
                elif isinstance(exc, (StreamBroken, ValueError, KeyError)):
                    log.warning("worker %s: %s; reconnecting", self.address, exc)
                else:
                    log.debug("worker %s event stream ended: %r", self.address, exc)
            if self.state.connected:
                self.state.connected = False
                self._update_status()
            self.state.reconnects += 1
            await self._pause(backoff)
            backoff = min(backoff * 2, 2.0)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        s = self.state
        if kind == "event":
            event_id = int(message["id"])
            if event_id != s.last_event_id + 1:
                s.gaps += 1
                raise StreamBroken(f"event {event_id} after {s.last_event_id}: gap")
            self.router.index.apply(self.address, event_from_dict(message["event"]))
            s.last_event_id = event_id
            s.events += 1
            if self._replaying:
                s.replayed_events += 1
        elif kind == "load":
            self._replaying = False
            previous, s.report = s.report, message
            info = self.router.workers.get(self.address)
            if info is not None:
                info.load.reported_in_flight_tokens = int(message.get("in_flight_tokens", 0))
                info.load.reported_requests = int(message.get("num_running", 0)) + int(
                    message.get("num_waiting", 0)
                )
                info.load.max_num_tokens = int(
                    message.get("max_num_tokens", info.load.max_num_tokens)
                )
            self.on_report(self.address, previous, message)
            self.on_change()
        elif kind == "hello":
            self._hello(message)
        elif kind == "snapshot":
            self.router.index.replace(
                self.address,
                [(int(h), None if p is None else int(p)) for h, p in message["blocks"]],
            )
            s.last_event_id = int(message["id"])
            s.snapshots += 1
            self._replaying = False
        else:
            raise StreamBroken(f"unknown message type {kind!r}")

    def _hello(self, message: dict[str, Any]) -> None:
        s = self.state
        instance = str(message["instance"])
        if s.instance is not None and instance != s.instance:
            log.info("worker %s restarted (instance %s)", self.address, instance)
            s.report = {}  # its counters start again from zero
        s.instance = instance
        s.block_size = int(message["block_size"])
        # Workers that predate disaggregation announce no role: they serve both phases.
        role = str(message.get("role", "both"))
        self.router.add_worker(self.address, block_size=s.block_size, role=role)
        s.role = role
        s.connected = True
        self._update_status()
