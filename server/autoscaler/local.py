"""The local actuator behind `bisllm serve --workers MIN..MAX --autoscale`: worker processes on
this machine, started and retired so that ready plus starting workers match the planner's count.

- **Up.** A worker being drained is taken back first (its KV cache is warm); then new workers
  are started. A new worker joins the router only once its /health answers, so no request waits
  on a process that is still loading its weights; until then it is "starting", which the
  policy already counts as capacity.
- **Down.** Starting workers are stopped first (newest first: they serve nobody yet). Then the
  ready worker with the least in-flight load is drained: the router sends it nothing new, and it
  is retired only once it holds no request, the router's own count and the worker's report
  both at zero. Its graceful shutdown would finish stragglers anyway; draining first keeps that
  path for accidents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from bisllm_server.router.fleet import WorkerFleet
    from bisllm_server.router.scoring import WorkerLoad
    from bisllm_server.router.service import RouterService

log = logging.getLogger("bisllm.autoscaler")


class LocalActuator:
    def __init__(
        self,
        fleet: WorkerFleet,
        service: RouterService,
        *,
        probe_interval_s: float = 0.2,
        start_timeout_s: float = 900.0,
    ) -> None:
        self.fleet = fleet
        self.service = service
        self.probe_interval_s = probe_interval_s
        self.start_timeout_s = start_timeout_s
        self.starting: dict[str, asyncio.Task] = {}  # address -> its readiness probe
        self.draining: list[str] = []
        self.started_total = 0
        self.retired_total = 0

    @property
    def serving(self) -> list[str]:
        """Workers registered with the router and not being drained."""
        return [
            a for a in self.fleet.addresses if a not in self.starting and a not in self.draining
        ]

    async def apply(self, replicas: int) -> None:
        await self._finish_drains()
        planned = len(self.serving) + len(self.starting)
        if replicas > planned:
            await self._scale_up(replicas - planned)
        elif replicas < planned:
            await self._scale_down(planned - replicas)

    async def _scale_up(self, count: int) -> None:
        while count and self.draining:
            address = self.draining.pop()
            self.service.drain(address, False)
            log.info("worker %s taken back from draining", address)
            count -= 1
        for _ in range(count):
            address = await asyncio.to_thread(self.fleet.add)
            self.started_total += 1
            self.starting[address] = asyncio.create_task(
                self._bring_up(address), name=f"start {address}"
            )

    async def _bring_up(self, address: str) -> None:
        """Probe /health until the worker answers, then register it with the router."""
        assert self.service.client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        try:
            while loop.time() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    response = await self.service.client.get(
                        f"http://{address}/health", headers=self.service.worker_headers, timeout=2.0
                    )
                    if response.status_code == 200:
                        await self.service.add_worker(address)
                        log.info("worker %s is up and registered", address)
                        return
                await asyncio.sleep(self.probe_interval_s)  # a readiness probe's period
            log.error(
                "worker %s did not become healthy in %.0f s; retiring it",
                address,
                self.start_timeout_s,
            )
            self._retire(address)
        finally:
            self.starting.pop(address, None)

    async def _scale_down(self, count: int) -> None:
        for address in reversed(list(self.starting)):
            if not count:
                return
            task = self.starting.pop(address)
            task.cancel()
            self._retire(address)
            count -= 1
        router = self.service.router
        while count:
            # The policy never asks for fewer than one replica, so this never drains the last.
            candidates = [a for a in self.serving if a in router.workers]
            if not candidates:
                return
            address = min(candidates, key=lambda a: _busy(router.workers[a].load))
            self.service.drain(address, True)
            self.draining.append(address)
            log.info("draining worker %s", address)
            count -= 1

    async def _finish_drains(self) -> None:
        router = self.service.router
        for address in list(self.draining):
            info = router.workers.get(address)
            if info is not None and info.load.requests > 0:
                continue
            self.draining.remove(address)
            await self.service.remove_worker(address)
            self._retire(address)

    def _retire(self, address: str) -> None:
        """The worker leaves the fleet now; its process exits in the background (a graceful
        shutdown can take a while)."""
        if self.fleet.retire(address) is not None:
            self.retired_total += 1

    def report(self) -> dict[str, Any]:
        return {
            "serving": self.serving,
            "starting": list(self.starting),
            "draining": list(self.draining),
            "started_total": self.started_total,
            "retired_total": self.retired_total,
        }

    async def close(self) -> None:
        for task in self.starting.values():
            task.cancel()
        await asyncio.gather(*self.starting.values(), return_exceptions=True)


def _busy(load: WorkerLoad) -> tuple[int, int]:
    """How much a drain of this worker would wait for: tokens first, then requests."""
    return load.in_flight_tokens, load.requests
