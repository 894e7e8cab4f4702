"""The router's prompt ids equal the worker's, whether it renders them itself or asks a
worker's /tokenize: otherwise its block hashes would never match the worker's cache."""

from __future__ import annotations

import asyncio

import httpx
from server_fixtures import GCD_QUESTION, GCD_TOOL, REPO, tiny_server

from bisllm_server.engine.engine import load_tokenizer
from bisllm_server.openai.protocol import ChatCompletionRequest, CompletionRequest
from bisllm_server.router.prompts import PromptTokenizer

CHECKPOINT = REPO / "examples" / "bisllm-tiny-moe" / "checkpoint"


def test_local_and_remote_tokenization_agree_with_the_worker() -> None:
    chat_body = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": GCD_QUESTION},
        ],
        "tools": [GCD_TOOL],
        "chat_template_kwargs": {"enable_thinking": False},
        "max_tokens": 1,
        "temperature": 0,
    }
    completion_body = {"prompt": "def gcd(a, b):", "max_tokens": 1}
    with tiny_server() as worker:

        async def remote(body: dict) -> list[int]:
            async with httpx.AsyncClient() as client:
                response = await client.post(f"{worker.url}/tokenize", json=body)
                response.raise_for_status()
                return response.json()["tokens"]

        local = PromptTokenizer(load_tokenizer(CHECKPOINT))
        asked = PromptTokenizer(None, remote=remote)
        for body, model, path in (
            (chat_body, ChatCompletionRequest, "/v1/chat/completions"),
            (completion_body, CompletionRequest, "/v1/completions"),
        ):
            request = model.model_validate(body)
            served = httpx.post(f"{worker.url}{path}", json=body, timeout=60).json()
            expected = served["usage"]["prompt_tokens"]
            ids_local = asyncio.run(local.prompt_ids(request))
            ids_remote = asyncio.run(asked.prompt_ids(request))
            assert ids_local == ids_remote
            assert len(ids_local) == expected
        # The tools are part of the rendered chat: without them the prompt is shorter.
        bare = ChatCompletionRequest.model_validate({**chat_body, "tools": None})
        assert len(asyncio.run(local.prompt_ids(bare))) < len(
            asyncio.run(local.prompt_ids(ChatCompletionRequest.model_validate(chat_body)))
        )
