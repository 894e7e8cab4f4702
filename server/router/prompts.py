"""The token ids of a request's prompt, as the worker will see them, so the router's block
hashes land on the ids the worker's cache publishes.

With the checkpoint's tokenizer on the router's machine (`bisllm serve --workers N`, or a router
given the model directory) the router renders exactly what the worker renders. Without it (a
router pod that mounts only the config) it asks a worker's `/tokenize`, with the same chat
fields (tools, template kwargs), at the cost of a round trip.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bisllm_server.openai.errors import APIError
from bisllm_server.openai.prompts import chat_prompt, encode_prompt
from bisllm_server.openai.protocol import ChatCompletionRequest, CompletionRequest

RemoteTokenize = Callable[[dict[str, Any]], Awaitable[list[int]]]


class PromptTokenizer:
    def __init__(
        self,
        tokenizer: Any | None,
        *,
        vocab_size: int | None = None,
        remote: RemoteTokenize | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size if vocab_size is not None else 1 << 31
        self.remote = remote

    async def prompt_ids(self, request: ChatCompletionRequest | CompletionRequest) -> list[int]:
        """The ids routing keys on: the chat prompt, or a completion's first prompt (a batch of
        prompts goes to one worker together)."""
        if isinstance(request, ChatCompletionRequest):
            if self.tokenizer is not None:
                return chat_prompt(self.tokenizer, request)[0]
            tools = request.tools if request.effective_tool_choice != "none" else None
            return await self._remote(
                {
                    "messages": [m.model_dump(exclude_none=True) for m in request.messages],
                    "add_generation_prompt": request.add_generation_prompt,
                    "continue_final_message": request.continue_final_message,
                    "tools": [t.model_dump(exclude_none=True) for t in tools] if tools else None,
                    "chat_template_kwargs": request.chat_template_kwargs,
                }
            )
        first = request.prompts()[0]
        if isinstance(first, list) or self.tokenizer is not None:
            return encode_prompt(self.tokenizer, first, self.vocab_size)
        return await self._remote({"prompt": first})

    async def _remote(self, body: dict[str, Any]) -> list[int]:
        if self.remote is None:
            raise APIError(503, "the router has no tokenizer and no worker to tokenize with")
        return await self.remote(body)
