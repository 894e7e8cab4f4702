"""Which workers exist: `--workers HOST:PORT[,HOST:PORT...]`, where a host name may resolve to
many addresses (a Kubernetes headless Service lists every ready pod), so it is resolved again
periodically and workers come and go with the pods."""

from __future__ import annotations

import ipaddress
import socket


class WorkerSpecError(ValueError):
    pass


def parse_workers(spec: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (IPv6 literals in brackets) -> [(host, port)]."""
    targets = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise WorkerSpecError(
                f"--workers: {item!r} is not HOST:PORT (e.g. 10.0.0.5:8000 or workers:8000)"
            )
        targets.append((host.strip("[]"), int(port_text)))
    if not targets:
        raise WorkerSpecError("--workers: no HOST:PORT given")
    return targets


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_workers(targets: list[tuple[str, int]]) -> list[str]:
    """Every worker address the targets name now; a name that does not resolve contributes none
    (its pods may not be up yet). IPv4 is preferred when a name has both families, so
    `localhost` is one worker and not two."""
    found: dict[str, None] = {}
    for host, port in targets:
        if _is_ip(host):
            found[format_address(host, port)] = None
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        v4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
        addresses = v4 or [info[4][0] for info in infos if info[0] == socket.AF_INET6]
        for address in sorted(set(addresses)):
            found[format_address(address, port)] = None
    return list(found)
