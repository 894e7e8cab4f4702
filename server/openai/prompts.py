"""Requests -> prompt token ids: chat messages through the checkpoint's chat template, raw
completion prompts through the tokenizer."""

from __future__ import annotations

from typing import Any

from bisllm_server.openai.errors import bad_request
from bisllm_server.openai.protocol import ChatCompletionRequest, ChatMessage, Tool


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat templates read them: text content, tool calls with their
    arguments, tool results with their call id."""
    rendered = []
    for i, message in enumerate(messages):
        try:
            content = message.text()
        except ValueError as exc:
            raise bad_request(str(exc), param=f"messages[{i}].content") from None
        entry: dict[str, Any] = {"role": message.role, "content": content}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = message.tool_calls
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.reasoning_content is not None:
            entry["reasoning_content"] = message.reasoning_content
        rendered.append(entry)
    return rendered


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    tools: list[Tool] | None,
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any] | None,
) -> tuple[list[int], str]:
    """(token ids, text) of the rendered conversation. The template adds any BOS itself, so
    the text is tokenized without special tokens."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model has no chat template; use /v1/completions with a raw prompt",
            param="messages",
        )
    kwargs = dict(template_kwargs or {})
    reserved = {"messages", "tools", "add_generation_prompt", "continue_final_message", "tokenize"}
    clash = sorted(reserved & set(kwargs))
    if clash:
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(clash)}; use the request fields",
            param="chat_template_kwargs",
        )
    try:
        text = tokenizer.apply_chat_template(
            message_dicts(messages),
            tools=[tool.model_dump(exclude_none=True) for tool in tools] if tools else None,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **kwargs,
        )
    except Exception as exc:  # template errors (jinja, raise_exception) are the caller's input
        raise bad_request(
            f"the chat template could not render these messages: {exc}", "messages"
        ) from None
    return list(tokenizer.encode(text, add_special_tokens=False)), text


def chat_prompt(tokenizer: Any, request: ChatCompletionRequest) -> tuple[list[int], str]:
    """A chat request's prompt as the worker renders it (tools only when tool_choice allows);
    the router renders with this too, so its block hashes match the worker's cache."""
    tools = request.tools if request.effective_tool_choice != "none" else None
    return render_chat(
        tokenizer,
        request.messages,
        tools=tools,
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
        template_kwargs=request.chat_template_kwargs,
    )


def encode_prompt(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A completion prompt as token ids; text gets the tokenizer's special tokens (BOS)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_request("this model has no tokenizer; send token ids", param="prompt")
        return list(tokenizer.encode(prompt))
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt"
        )
    return list(prompt)
