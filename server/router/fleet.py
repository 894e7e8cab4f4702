"""`bisllm serve --workers N` (or `MIN..MAX --autoscale`): engine worker processes on this
machine, each a plain `bisllm serve --role worker` on its own loopback port, restarted if one
dies (as Kubernetes restarts a pod). The router runs in the parent process and finds them by
address; with --autoscale its planner adds and retires workers."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("bisllm.router")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the OS has just handed out (held until all are chosen, so they
    differ; another process could still take one before the worker binds it, which the worker
    would report as a clear bind error)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class FleetWorker:
    port: int
    process: subprocess.Popen | None = None
    retired: bool = False  # asked to stop for good (scaled down): never restarted


class WorkerFleet:
    """Worker processes on this machine. `start()` launches the first `count`; the autoscaler's
    local actuator adds more with `add()` and stops them with `retire()`. A worker that dies
    unasked is restarted on the same port (as Kubernetes restarts a pod)."""

    def __init__(
        self,
        count: int,
        command: Callable[[int], Sequence[str]],
        *,
        host: str = "127.0.0.1",
        restart: bool = True,
        restart_delay_s: float = 1.0,
        env: dict[str, str] | None = None,
        max_count: int | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"--workers must be at least 1, got {count}")
        self.command = command  # port -> argv of one worker
        self.host = host
        self.restart = restart
        self.restart_delay_s = restart_delay_s
        self.env = dict(os.environ if env is None else env)
        # Split the cores between the workers instead of letting each claim all of them (sized
        # for the most workers the fleet may run at once).
        most = max(count, max_count or count)
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // most)))
        self.workers: dict[str, FleetWorker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        for port in free_ports(count, host):
            self.workers[self._address(port)] = FleetWorker(port)

    def _address(self, port: int) -> str:
        return f"{self.host}:{port}"

    @property
    def addresses(self) -> list[str]:
        """Every worker not retired, oldest first."""
        with self._lock:
            return [a for a, w in self.workers.items() if not w.retired]

    def start(self) -> None:
        for address in self.addresses:
            self._launch(address)

    def add(self) -> str:
        """Start one more worker on a fresh port; its address (it serves once /health says so)."""
        if self._stopping.is_set():
            raise RuntimeError("the fleet is stopping")
        (port,) = free_ports(1, self.host)
        address = self._address(port)
        with self._lock:
            self.workers[address] = FleetWorker(port)
        self._launch(address)
        return address

    def _launch(self, address: str) -> None:
        worker = self.workers[address]
        self._spawn(address, worker)
        threading.Thread(target=self._watch, args=(address, worker), daemon=True).start()

    def _spawn(self, address: str, worker: FleetWorker) -> None:
        argv = list(self.command(worker.port))
        log.info("starting worker %s", address)
        worker.process = subprocess.Popen(argv, env=self.env, preexec_fn=_die_with_parent)

    def _watch(self, address: str, worker: FleetWorker) -> None:
        while True:
            process = worker.process
            assert process is not None
            code = process.wait()
            if self._stopping.is_set() or worker.retired or not self.restart:
                return
            log.warning("worker %s exited with %s; restarting", address, code)
            # A pause between restarts, so a worker that cannot start does not spin.
            if self._stopping.wait(self.restart_delay_s) or worker.retired:
                return
            self._spawn(address, worker)

    def retire(self, address: str, timeout_s: float = 30.0) -> threading.Thread | None:
        """Stop one worker for good. It leaves `addresses` at once and gets SIGTERM (its
        graceful shutdown lets in-flight requests finish); a thread waits for it to exit and
        SIGKILLs it after `timeout_s`. That thread, or None if there was nothing to retire."""
        with self._lock:
            worker = self.workers.get(address)
            if worker is None or worker.retired:
                return None
            worker.retired = True
        log.info("retiring worker %s", address)

        def reap() -> None:
            _terminate([worker.process], timeout_s)
            with self._lock:
                self.workers.pop(address, None)

        thread = threading.Thread(target=reap, name=f"retire {address}", daemon=True)
        thread.start()
        return thread

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every worker (a graceful shutdown: in-flight requests finish), then SIGKILL
        whatever is still running after `timeout_s`. Safe to call twice."""
        self._stopping.set()
        with self._lock:
            processes = [w.process for w in self.workers.values()]
        _terminate(processes, timeout_s)


def _terminate(processes: Sequence[subprocess.Popen | None], timeout_s: float) -> list[int | None]:
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for process in processes:
        if process is None:
            codes.append(None)
            continue
        try:
            codes.append(process.wait(timeout_s))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM if the fleet's process dies, even by
    SIGKILL, so workers are never left behind holding memory and ports."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_command(
    config_path: str, extra: Sequence[str], *, role: str = "worker"
) -> Callable[[int], list[str]]:
    """argv for one worker: this interpreter running `bisllm serve --role ROLE` (worker, or
    prefill / decode in a disaggregated unit)."""

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bisllm_truss.cli",
            "serve",
            config_path,
            "--role",
            role,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ]

    return command
