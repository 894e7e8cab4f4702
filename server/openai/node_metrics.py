"""`GET /metrics/node`: every DP-attention rank's metrics of this node, from one port.

Under DP attention each rank of a pod serves its own port and its own `/metrics`. Prometheus'
pod annotations name one port per pod, so the node's first rank also answers for the others:
it reads each rank's page over loopback and re-exposes every sample with a `rank` label. The
autoscaler's query sums `bisllm_in_flight_tokens` over the pod, which must count every rank.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator

import httpx
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("bisllm.server")

RANK_LABEL = "rank"


class _Merged:
    """A one-shot collector over already-merged families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_rank_metrics(pages: Iterable[tuple[int, str]]) -> bytes:
    """(rank, its /metrics text) pairs -> one exposition, each sample labelled with its rank."""
    families: dict[str, Metric] = {}
    for rank, text in pages:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            for sample in family.samples:
                labels = {**sample.labels, RANK_LABEL: str(rank)}
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))  # type: ignore[arg-type]
    return generate_latest(registry)


def add_node_metrics_route(app: FastAPI, ranks: list[tuple[int, str]]) -> None:
    """Serve `/metrics/node` from `ranks`: (global rank, base URL) of this node's ranks."""

    async def page(client: httpx.AsyncClient, rank: int, url: str) -> tuple[int, str] | None:
        try:
            response = await client.get(url + "/metrics")
            response.raise_for_status()
            return rank, response.text
        except httpx.HTTPError as exc:  # a rank still starting, or gone: the rest still count
            log.warning("metrics of rank %d at %s unavailable: %s", rank, url, exc)
            return None

    @app.get("/metrics/node")
    async def node_metrics() -> Response:
        async with httpx.AsyncClient(timeout=5) as client:
            pages = await asyncio.gather(*(page(client, rank, url) for rank, url in ranks))
        body = merge_rank_metrics(p for p in pages if p is not None)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
