"""The decode worker's side of a K/V transfer: ask a prefill worker to prefill a prompt's
prefix and read the handoff it answers with.

One HTTP request per transfer (POST /internal/kv/prefill on the prefill worker):
- **Handshake.** The decode worker has already reserved the request's pages
  (`LLMEngine.reserve_kv`), so it asks only once the K/V has a place to land, and tells the
  prefill worker how many leading pages it holds already (`skip_pages`): those are not sent.
- **Transfer.** The answer starts when the prefill is done; its body is the serialized
  `KVHandoff` (magic, JSON header with a sha256, raw K/V), read to its announced length.
- **Failures.** A refused connection, a timeout (connect, stalled body, or an overall deadline),
  a connection lost mid-body, a non-200 answer or a checksum/length/prompt mismatch each move
  on to the next prefill worker the router named; when none is left the request is prefilled
  locally, into the same reserved pages. Nothing half-received is ever written into the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bisllm_server.disagg.metrics import TransferMetrics
from bisllm_server.engine.kv_handoff import HandoffFormatError, KVHandoff

log = logging.getLogger("bisllm.disagg")

PREFILL_PATH = "/internal/kv/prefill"


@dataclass
class TransferSettings:
    connect_timeout_s: float = 2.0
    # Longest silence while reading (a peer that stopped sending); the prefill itself happens
    # before the answer starts, so it is covered by the deadline, not by this.
    read_timeout_s: float = 30.0
    deadline_s: float = 300.0  # one attempt, prefill included
    max_bytes: int = 64 << 30


class TransferFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # one of metrics.FAILURE_REASONS


def parse_peers(value: str | None) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


class KVPuller:
    """Pulls handoffs for this decode worker; `source(peers)` is one request's `KVSource`."""

    def __init__(
        self,
        metrics: TransferMetrics,
        *,
        headers: dict[str, str] | None = None,
        settings: TransferSettings | None = None,
    ) -> None:
        self.metrics = metrics
        self.headers = headers or {}
        self.settings = settings or TransferSettings()
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # Created lazily, inside the server's event loop.
        if self._client is None:
            s = self.settings
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(s.read_timeout_s, connect=s.connect_timeout_s),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def source(self, peers: Sequence[str]) -> PeerSource:
        return PeerSource(self, list(peers))

    async def fetch(self, peer: str, prefix_ids: list[int], skip_pages: int) -> KVHandoff:
        """One attempt at one peer; TransferFailed says why it did not work."""
        s = self.settings
        started = time.perf_counter()
        body = {"prompt_ids": prefix_ids, "skip_pages": skip_pages}
        try:
            async with asyncio.timeout(s.deadline_s):
                async with self.client.stream(
                    "POST", f"http://{peer}{PREFILL_PATH}", json=body, headers=self.headers
                ) as response:
                    answered = time.perf_counter()
                    if response.status_code != 200:
                        text = (await response.aread())[:300]
                        raise TransferFailed(
                            "status", f"{peer} answered {response.status_code}: {text!r}"
                        )
                    payload = bytearray()
                    async for chunk in response.aiter_raw():
                        payload += chunk
                        if len(payload) > s.max_bytes:
                            raise TransferFailed("integrity", f"{peer} sent over {s.max_bytes} B")
                    done = time.perf_counter()
        except TimeoutError:
            raise TransferFailed("timeout", f"{peer}: no handoff within {s.deadline_s} s") from None
        except httpx.ConnectError as exc:
            raise TransferFailed("connect", f"{peer}: {exc!r}") from None
        except httpx.TimeoutException as exc:
            raise TransferFailed("timeout", f"{peer}: {exc!r}") from None
        except httpx.TransportError as exc:  # includes a body cut short
            raise TransferFailed("connection_lost", f"{peer}: {exc!r}") from None
        try:
            kv = KVHandoff.from_bytes(payload)
        except HandoffFormatError as exc:
            raise TransferFailed("integrity", f"{peer}: {exc}") from None
        if kv.prompt_ids != prefix_ids or kv.start_page != skip_pages:
            raise TransferFailed("integrity", f"{peer}: the handoff is for another prompt")
        self.metrics.received(len(payload), answered - started, done - answered)
        return kv


class PeerSource:
    """One request's prefill workers, tried in order (see `AsyncEngine`'s `KVSource`)."""

    def __init__(self, puller: KVPuller, peers: list[str]) -> None:
        self.puller = puller
        self.peers = peers

    async def fetch(self, prefix_ids: list[int], cached_pages: int) -> KVHandoff | None:
        for peer in self.peers:
            try:
                return await self.puller.fetch(peer, prefix_ids, cached_pages)
            except TransferFailed as exc:
                self.puller.metrics.failed(exc.reason)
                log.warning("K/V transfer from %s failed (%s): %s", peer, exc.reason, exc)
        self.unavailable("transfer_failed")
        return None

    def unavailable(self, reason: str) -> None:
        self.puller.metrics.fell_back(reason)
