"""The local actuator's rules (server/autoscaler/local.py) against a scripted fleet and router:
new workers join only once healthy, starting ones are stopped before serving ones, a drained
worker is retired only when it holds no request, and scaling up takes back a draining worker
before starting a process."""

from __future__ import annotations

import asyncio
import itertools

import httpx

from bisllm_server.autoscaler.local import LocalActuator
from bisllm_server.router.config import RouterConfig
from bisllm_server.router.core import Router


class ScriptedFleet:
    def __init__(self, addresses: list[str]) -> None:
        self.live = list(addresses)
        self.retired: list[str] = []
        self._ports = itertools.count(9100)

    @property
    def addresses(self) -> list[str]:
        return list(self.live)

    def add(self) -> str:
        address = f"127.0.0.1:{next(self._ports)}"
        self.live.append(address)
        return address

    def retire(self, address: str) -> object | None:
        if address not in self.live:
            return None
        self.live.remove(address)
        self.retired.append(address)
        return object()


class ScriptedService:
    """What the actuator uses of RouterService: the router, a client, drain and membership."""

    def __init__(self, workers: list[str]) -> None:
        self.router = Router(RouterConfig())
        for address in workers:
            self.router.add_worker(address, block_size=16)
        self.healthy: set[str] = set()
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._answer))
        self.worker_headers: dict[str, str] = {}
        self.probed = asyncio.Event()

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.probed.set()
        address = f"{request.url.host}:{request.url.port}"
        return httpx.Response(200 if address in self.healthy else 503)

    def drain(self, address: str, drained: bool) -> bool:
        self.router.set_status(address, "draining" if drained else "ready")
        return True

    async def add_worker(self, address: str) -> None:
        self.router.add_worker(address, block_size=16)

    async def remove_worker(self, address: str) -> None:
        self.router.remove_worker(address)


async def _until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    """Yield to the event loop until `check()` holds (the probe tasks run meanwhile)."""
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_new_workers_join_only_once_healthy() -> None:
    async def scenario() -> None:
        fleet = ScriptedFleet(["127.0.0.1:9000"])
        service = ScriptedService(fleet.addresses)
        actuator = LocalActuator(fleet, service, probe_interval_s=0.01)  # type: ignore[arg-type]
        await actuator.apply(2)
        (new,) = list(actuator.starting)
        await service.probed.wait()
        assert new not in service.router.workers, "registered before /health answered"
        await actuator.apply(2)  # still starting: counted, nothing more is started
        assert len(fleet.live) == 2
        service.healthy.add(new)
        await _until(lambda: new in service.router.workers, "registration")
        assert actuator.serving == ["127.0.0.1:9000", new] and not actuator.starting
        await actuator.close()

    asyncio.run(scenario())


def test_scale_down_stops_starting_workers_first_then_drains_the_least_loaded() -> None:
    async def scenario() -> None:
        fleet = ScriptedFleet(["127.0.0.1:9000", "127.0.0.1:9001"])
        service = ScriptedService(fleet.addresses)
        actuator = LocalActuator(fleet, service, probe_interval_s=0.01)  # type: ignore[arg-type]
        await actuator.apply(4)
        starting = list(actuator.starting)
        assert len(starting) == 2
        await actuator.apply(3)  # the newest starting worker goes, nothing is drained
        assert fleet.retired == [starting[1]] and not actuator.draining
        # A request in flight on 9000; 9001 is idle, so 9001 is the one drained.
        service.router.workers["127.0.0.1:9000"].load.active_requests = 1
        await actuator.apply(1)
        assert fleet.retired[1] == starting[0]
        assert actuator.draining == ["127.0.0.1:9001"]
        await actuator.close()

    asyncio.run(scenario())


def test_a_drained_worker_is_retired_only_when_it_holds_no_request() -> None:
    async def scenario() -> None:
        fleet = ScriptedFleet(["127.0.0.1:9000", "127.0.0.1:9001"])
        service = ScriptedService(fleet.addresses)
        actuator = LocalActuator(fleet, service)  # type: ignore[arg-type]
        for address in fleet.addresses:
            service.router.workers[address].load.active_requests = 1
        service.router.workers["127.0.0.1:9001"].load.reported_requests = 3
        await actuator.apply(1)
        (drained,) = actuator.draining
        assert service.router.workers[drained].status == "draining"
        load = service.router.workers[drained].load
        for active, reported in ((1, 3), (0, 3), (0, 1)):
            load.active_requests, load.reported_requests = active, reported
            await actuator.apply(1)
            assert fleet.retired == [], f"retired with {active} routed, {reported} reported"
        load.active_requests = load.reported_requests = 0
        await actuator.apply(1)
        assert fleet.retired == [drained] and drained not in service.router.workers
        assert actuator.serving == [a for a in fleet.addresses if a != drained]
        await actuator.close()

    asyncio.run(scenario())


def test_scale_up_takes_back_a_draining_worker_before_starting_one() -> None:
    async def scenario() -> None:
        fleet = ScriptedFleet(["127.0.0.1:9000", "127.0.0.1:9001"])
        service = ScriptedService(fleet.addresses)
        actuator = LocalActuator(fleet, service)  # type: ignore[arg-type]
        for address in fleet.addresses:
            service.router.workers[address].load.active_requests = 1
        await actuator.apply(1)
        (drained,) = actuator.draining
        await actuator.apply(2)
        assert not actuator.draining and not actuator.starting
        assert service.router.workers[drained].status == "ready"
        assert len(fleet.live) == 2 and not fleet.retired
        await actuator.close()

    asyncio.run(scenario())
