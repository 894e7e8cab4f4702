"""The prefill worker's side of a K/V transfer: POST /internal/kv/prefill.

It runs the prefix as a one-token request whose K/V is exported when it finishes
(`export_kv_from`), so its pages go straight back to the pool (and the prefix cache, for the
next prompt sharing the prefix): nothing waits on the decode worker, and a decode worker that
vanishes leaves nothing behind here. The answer starts only once the prefill is done; its
body is the serialized handoff, sent with its length so a cut connection is noticed.
"""

from __future__ import annotations

import asyncio
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from bisllm_server.disagg.metrics import TransferMetrics
from bisllm_server.disagg.transfer import PREFILL_PATH
from bisllm_server.engine.async_engine import AsyncEngine, EngineDeadError
from bisllm_server.engine.engine import RequestError
from bisllm_server.engine.sampling import SamplingParams
from bisllm_server.openai.app import unless_disconnected
from bisllm_server.openai.errors import APIError

# Only the K/V matters; the one token sampled to end the request is thrown away (the decode
# worker samples the first token itself, from the last prompt position).
PREFILL_ONLY = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


class PrefillRequest(BaseModel):
    prompt_ids: list[int] = Field(min_length=1)  # the prompt less its last token
    skip_pages: int = Field(0, ge=0)  # leading pages the decode worker holds already


def add_prefill_route(app: FastAPI, engine: AsyncEngine, metrics: TransferMetrics) -> None:
    @app.post(PREFILL_PATH)
    async def prefill(body: PrefillRequest, request: Request) -> Response:
        payload = await unless_disconnected(request, _prefill(engine, body))
        if payload is None:  # the decode worker gave up; the request was aborted
            return Response(status_code=499)
        metrics.exported(len(payload))
        return Response(payload, media_type="application/octet-stream")


async def _prefill(engine: AsyncEngine, body: PrefillRequest) -> bytes:
    try:
        stream = engine.open(
            body.prompt_ids,
            PREFILL_ONLY,
            request_id=f"prefill-{uuid.uuid4().hex}",
            detokenize=False,
            export_kv_from=body.skip_pages,
        )
    except RequestError as exc:
        raise APIError(400, f"prompt_ids: {exc}", param="prompt_ids") from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_dead") from None
    kv = None
    try:
        async for out in stream:
            kv = out.kv
    finally:
        stream.close()
    if kv is None:
        raise APIError(503, "the prefill was aborted", code="prefill_aborted")
    # Serializing copies and hashes every byte: off the event loop.
    return await asyncio.to_thread(kv.to_bytes)
