"""`bisllm serve --workers N`: N engine worker processes on this machine, each a plain
`bisllm serve --role worker` on its own loopback port, restarted if one dies (as Kubernetes
restarts a pod). The router runs in the parent process and finds them by address."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

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


class WorkerFleet:
    def __init__(
        self,
        count: int,
        command: Callable[[int], Sequence[str]],
        *,
        host: str = "127.0.0.1",
        restart: bool = True,
        restart_delay_s: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"--workers must be at least 1, got {count}")
        self.count = count
        self.command = command  # port -> argv of one worker
        self.host = host
        self.restart = restart
        self.restart_delay_s = restart_delay_s
        self.env = dict(os.environ if env is None else env)
        # Split the cores between the workers instead of letting each claim all of them.
        self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
        self.ports = free_ports(count, host)
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.restarts = [0] * count
        self._stopping = threading.Event()
        self._watchers: list[threading.Thread] = []

    @property
    def addresses(self) -> list[str]:
        return [f"{self.host}:{port}" for port in self.ports]

    def start(self) -> None:
        for i in range(self.count):
            self._spawn(i)
            watcher = threading.Thread(target=self._watch, args=(i,), daemon=True)
            watcher.start()
            self._watchers.append(watcher)

    def _spawn(self, i: int) -> None:
        argv = list(self.command(self.ports[i]))
        log.info("starting worker %d on %s:%d", i, self.host, self.ports[i])
        self.processes[i] = subprocess.Popen(argv, env=self.env, preexec_fn=_die_with_parent)

    def _watch(self, i: int) -> None:
        while True:
            process = self.processes[i]
            assert process is not None
            code = process.wait()
            if self._stopping.is_set() or not self.restart:
                return
            log.warning("worker %d exited with %s; restarting", i, code)
            # A pause between restarts, so a worker that cannot start does not spin.
            if self._stopping.wait(self.restart_delay_s):
                return
            self.restarts[i] += 1
            self._spawn(i)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every worker (a graceful shutdown: in-flight requests finish), then SIGKILL
        whatever is still running after `timeout_s`. Safe to call twice."""
        self._stopping.set()
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            if process is None:
                continue
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM if the fleet's process dies, even by
    SIGKILL, so workers are never left behind holding memory and ports."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_command(config_path: str, extra: Sequence[str]) -> Callable[[int], list[str]]:
    """argv for one worker: this interpreter running `bisllm serve --role worker`."""

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bisllm_truss.cli",
            "serve",
            config_path,
            "--role",
            "worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ]

    return command
