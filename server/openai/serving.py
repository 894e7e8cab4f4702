"""The endpoints' logic over the async engine: chat and legacy completions (streamed or not),
tokenize / detokenize, the model list.

Each choice of a request is one engine request (n > 1 shares the prompt through the prefix
cache). Generated text goes through the family's reasoning parser, then its tool-call parser;
streaming runs the same parsers incrementally, so a stream's deltas add up to the non-streamed
message. Everything about a bad request is decided before the first byte is sent, so errors are
plain HTTP errors; only an engine failure mid-stream becomes an `error` event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bisllm_server.disagg.transfer import KVPuller
from bisllm_server.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from bisllm_server.engine.engine import RequestError
from bisllm_server.engine.request import RequestOutput
from bisllm_server.engine.sampling import LogitsProcessor, SamplingParamsError
from bisllm_server.openai import tool_parsers
from bisllm_server.openai.errors import APIError, bad_request, error_body
from bisllm_server.openai.kv_event_stream import KVEventLog
from bisllm_server.openai.logprobs import TokenText, chat_logprobs, completion_logprobs
from bisllm_server.openai.metrics import ServerMetrics
from bisllm_server.openai.prompts import chat_prompt, encode_prompt, render_chat
from bisllm_server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    NamedToolChoice,
    TokenizeRequest,
)
from bisllm_server.openai.reasoning import ReasoningParser, reasoning_parser_for
from bisllm_server.openai.sampling import LogitBias, build_params, resolve_max_tokens
from bisllm_server.openai.structured import (
    GrammarCompiler,
    StructuredOutputError,
    ToolCallStyle,
)
from bisllm_server.openai.tool_parsers import ForcedJsonToolParser, ToolParser, tool_parser_for

log = logging.getLogger("bisllm.server")


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    # Engine requests allowed to wait beyond the running batch (max_batch_size); a request that
    # would push the waiting queue past it gets 503 + Retry-After.
    max_queued_requests: int = 1024
    retry_after_seconds: int = 1
    # Reject requests naming another model with 404 (default: accept any name, as BIS-LLM).
    strict_model_name: bool = False


@dataclass
class _Choice:
    """What one engine request has produced so far."""

    index: int
    stream: RequestStream
    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        self.tops += out.new_top_logprobs
        self.cached_tokens = out.num_cached_tokens
        if out.finished:
            # "abort" only reaches a client when a constraint left no token: report a stop.
            self.finish_reason = "stop" if out.finish_reason == "abort" else out.finish_reason
            self.stop_reason = out.stop_reason


class _Timing:
    """Per-request latency bookkeeping for the metrics."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first = True

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first:
            self.metrics.first_token(now - self.start)
            self.first = False
            if n > 1:
                self.metrics.tokens_emitted(n - 1, 0.0)
        else:
            self.metrics.tokens_emitted(n, now - self.last)
        self.last = now


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: ServerSettings,
        metrics: ServerMetrics,
        *,
        model_type: str | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        llm = engine.engine
        self.tokenizer = llm.tokenizer
        self.vocab_size = llm.model_config.vocab_size
        self.max_seq_len = llm.max_seq_len
        template = getattr(self.tokenizer, "chat_template", None)
        if not isinstance(template, str):
            template = None
        # The family picks the output parsers; a multimodal wrapper's text model is the same.
        self.model_type = model_type or llm.model_config.model_type
        model_type = self.model_type
        self.tool_parser_cls: type[ToolParser] | None = None
        parser = tool_parser_for(model_type, template)
        if parser is not None:
            self.tool_parser_cls = type(parser)
        self.reasoning_parser: ReasoningParser | None = reasoning_parser_for(model_type, template)
        self.names = TokenText(self.tokenizer)
        self.grammar = (
            GrammarCompiler(
                self.tokenizer, self.vocab_size, stop_token_ids=sorted(llm.eos_token_ids)
            )
            if self.tokenizer is not None
            else None
        )
        self.active = 0  # engine requests admitted and not yet finished
        # The KV-event log `/kv_events` streams; set by launch.build_server (None: no route).
        self.kv_event_log: KVEventLog | None = None
        # Pulls prompts' K/V from prefill workers (disaggregated serving); set by build_server.
        self.kv_puller: KVPuller | None = None

    # -- shared ---------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if self.settings.strict_model_name and name not in (None, self.settings.served_model_name):
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves "
                f"`{self.settings.served_model_name}`.",
                param="model",
                code="model_not_found",
            )

    def _admit(self, count: int) -> None:
        running = self.engine.engine.config.max_batch_size
        limit = running + self.settings.max_queued_requests
        if self.active + count > limit:
            raise APIError(
                503,
                f"the server is at capacity ({self.active} requests in flight, {count} more "
                f"asked; room for {running} running and {self.settings.max_queued_requests} "
                f"waiting); retry after {self.settings.retry_after_seconds}s",
                code="server_overloaded",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )

    def _open(
        self, prompt_ids: list[int], params: Any, index: int, prefill_peers: Sequence[str]
    ) -> _Choice:
        source = None
        if prefill_peers and self.kv_puller is not None:
            source = self.kv_puller.source(prefill_peers)
        try:
            stream = self.engine.open(
                prompt_ids, params, request_id=f"{uuid.uuid4().hex}-{index}", kv_source=source
            )
        except (RequestError, SamplingParamsError) as exc:
            raise bad_request(str(exc)) from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from None
        self.active += 1
        self.metrics.request_started()
        return _Choice(index, stream, len(prompt_ids))

    def _release(self, choices: Sequence[_Choice], timing: _Timing) -> None:
        """Close the choices' streams (aborting unfinished ones) and account for them once."""
        for choice in choices:
            choice.stream.close()
            self.metrics.request_finished(
                choice.prompt_tokens,
                len(choice.token_ids),
                choice.cached_tokens,
                time.perf_counter() - timing.start,
                choice.finish_reason or "abort",
            )
        self.active -= len(choices)

    def _open_all(
        self,
        runs: list[tuple[list[int], Any]],
        timing: _Timing,
        prefill_peers: Sequence[str] = (),
    ) -> list[_Choice]:
        self._admit(len(runs))
        choices: list[_Choice] = []
        try:
            for index, (prompt_ids, params) in enumerate(runs):
                choices.append(self._open(prompt_ids, params, index, prefill_peers))
        except BaseException:
            self._release(choices, timing)
            raise
        return choices

    async def _collect(self, choices: list[_Choice], timing: _Timing) -> None:
        async def drain(choice: _Choice) -> None:
            async for out in choice.stream:
                choice.add(out)
                timing.tokens(len(out.new_token_ids))

        await asyncio.gather(*(drain(c) for c in choices))

    async def _merged(self, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        """Every choice's outputs, interleaved as they arrive."""
        if len(choices) == 1:  # the common case: no pump task, no second queue
            choice = choices[0]
            async for out in choice.stream:
                choice.add(out)
                yield choice, out
            return
        queue: asyncio.Queue[tuple[_Choice, RequestOutput | BaseException]] = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            try:
                async for out in choice.stream:
                    queue.put_nowait((choice, out))
            except Exception as exc:  # the engine died: hand it to the consumer
                queue.put_nowait((choice, exc))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            remaining = len(choices)
            while remaining:
                choice, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                choice.add(item)
                if item.finished:
                    remaining -= 1
                yield choice, item
        finally:
            for task in tasks:
                task.cancel()

    def _usage(self, prompt_tokens: int, choices: list[_Choice]) -> dict[str, Any]:
        completion = sum(len(c.token_ids) for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": max(c.cached_tokens for c in choices)},
        }

    def _processors(self, bias: dict[str, float] | None) -> list[LogitsProcessor]:
        return [LogitBias(bias, self.vocab_size)] if bias else []

    def _log_unknown(self, request: Any) -> None:
        unknown = request.unknown_fields()
        if unknown:
            log.warning("ignoring unsupported request fields: %s", ", ".join(unknown))

    # -- chat -------------------------------------------------------------------------------

    async def _chat_grammar(self, request: ChatCompletionRequest) -> Any:
        """The compiled grammar a request's output must follow (forced tool calls or a
        response format), or None for free text. Each choice gets its own matcher over it."""
        choice = request.effective_tool_choice
        forced_tools = choice == "required" or isinstance(choice, NamedToolChoice)
        fmt = request.response_format
        if not forced_tools and (fmt is None or fmt.type == "text"):
            return None
        if self.grammar is None:
            raise bad_request("constrained output needs the model's tokenizer", "response_format")
        try:
            if forced_tools:
                tools = [t.function.model_dump(exclude_none=True) for t in request.tools or []]
                compiled = await self.grammar.atool_calls(
                    tools,
                    required_name=choice.function.name
                    if isinstance(choice, NamedToolChoice)
                    else None,
                    parallel=request.parallel_tool_calls,
                    style=self._forced_tool_style(),
                )
            elif fmt is not None and fmt.type == "json_object":
                compiled = await self.grammar.ajson_object()
            else:
                assert fmt is not None and fmt.json_schema is not None
                schema = fmt.json_schema.json_schema or {"type": "object"}
                compiled = await self.grammar.ajson_schema(schema)
        except StructuredOutputError as exc:
            param = "tools" if forced_tools else "response_format"
            raise bad_request(str(exc), param=param) from None
        return compiled

    def _forced_tool_style(self) -> ToolCallStyle:
        """Forced calls use the family's native format where a grammar of it exists (Hermes /
        Qwen); other families get a JSON array of calls, read by ForcedJsonToolParser."""
        hermes = self.tool_parser_cls is not None and self.tool_parser_cls.name == "hermes"
        return "hermes" if hermes else "json"

    def _output_parser(self, request: ChatCompletionRequest, tools: Any) -> Any:
        """The tool-call parser for this request's output, or None for plain text."""
        choice = request.effective_tool_choice
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and self._forced_tool_style() == "json":
            return ForcedJsonToolParser
        if tools or self._always_parse():
            return self.tool_parser_cls
        return None

    async def chat(
        self, request: ChatCompletionRequest, prefill_peers: Sequence[str] = ()
    ) -> dict[str, Any] | AsyncIterator[str]:
        """`prefill_peers`: prefill workers to pull the prompt's K/V from (disaggregated
        serving; the router names them), else the prompt is prefilled here."""
        self.check_model(request.model)
        self._log_unknown(request)
        tools = request.tools if request.effective_tool_choice != "none" else None
        prompt_ids, prompt_text = chat_prompt(self.tokenizer, request)
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = resolve_max_tokens(requested, len(prompt_ids), self.max_seq_len, "messages")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        tool_parser = self._output_parser(request, tools)
        # Whether the output starts inside a think block depends on this request's prompt.
        reasoning = self.reasoning_parser.for_prompt(prompt_text) if self.reasoning_parser else None
        grammar = await self._chat_grammar(request)
        runs = []
        for i in range(request.n):
            processors = self._processors(request.logit_bias)
            if grammar is not None:
                assert self.grammar is not None
                processors.append(self.grammar.new_processor(grammar))
            seed = None if request.seed is None else request.seed + i
            params = build_params(
                request,
                max_tokens=max_tokens,
                logprobs=logprobs,
                seed=seed,
                processors=processors,
                skip_special_tokens=request.skip_special_tokens and not self._always_parse(),
            )
            runs.append((prompt_ids, params))
        timing = _Timing(self.metrics)
        choices = self._open_all(runs, timing, prefill_peers)
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name)
        if request.stream:
            return self._chat_stream(
                request, prompt_ids, choices, timing, meta, tool_parser, reasoning
            )
        try:
            await self._collect(choices, timing)
        finally:
            self._release(choices, timing)
        return {
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "choices": [self._chat_choice(request, c, tool_parser, reasoning) for c in choices],
            "usage": self._chat_usage(len(prompt_ids), choices, reasoning),
            "system_fingerprint": None,
        }

    def _always_parse(self) -> bool:
        """GPT-OSS's harmony channels must be parsed whatever the tools."""
        return self.tool_parser_cls is not None and self.tool_parser_cls.name == "gpt_oss"

    @property
    def model_name(self) -> str:
        """What responses report, whatever name the request gave."""
        return self.settings.served_model_name

    def _split(
        self, text: str, tool_parser: Any, parser: ReasoningParser | None
    ) -> tuple[str | None, str | None, list[Any]]:
        """(reasoning, content, tool calls) of a finished choice's text."""
        reasoning, content = parser.parse(text) if parser else (None, text or None)
        calls: list[Any] = []
        if tool_parser is not None:
            parsed = tool_parser().parse(content or "")
            content, calls = parsed.content, parsed.tool_calls
            reasoning = reasoning or parsed.reasoning
        return reasoning, content, calls

    def _chat_choice(
        self,
        request: ChatCompletionRequest,
        choice: _Choice,
        tool_parser: Any,
        parser: ReasoningParser | None,
    ) -> dict[str, Any]:
        reasoning, content, calls = self._split("".join(choice.text), tool_parser, parser)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in calls
            ]
        if reasoning is not None and request.include_reasoning:
            message["reasoning_content"] = message["reasoning"] = reasoning
        finish = choice.finish_reason
        if calls and finish == "stop":
            finish = "tool_calls"
        return {
            "index": choice.index,
            "message": message,
            "logprobs": chat_logprobs(self.names, choice.token_ids, choice.logprobs, choice.tops)
            if request.logprobs
            else None,
            "finish_reason": finish,
            "stop_reason": choice.stop_reason,
        }

    def _chat_usage(
        self, prompt_tokens: int, choices: list[_Choice], parser: ReasoningParser | None
    ) -> dict[str, Any]:
        usage = self._usage(prompt_tokens, choices)
        reasoning_tokens = 0
        if parser is not None and self.tokenizer is not None:
            for choice in choices:
                reasoning, _ = parser.parse("".join(choice.text))
                if reasoning:
                    reasoning_tokens += len(
                        self.tokenizer.encode(reasoning, add_special_tokens=False)
                    )
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return usage

    async def _chat_stream(
        self,
        request: ChatCompletionRequest,
        prompt_ids: list[int],
        choices: list[_Choice],
        timing: _Timing,
        meta: _Meta,
        tool_parser: Any,
        reasoning: ReasoningParser | None,
    ) -> AsyncIterator[str]:
        states = {
            c.index: _ChatStreamState(self, tool_parser, reasoning, request.include_reasoning)
            for c in choices
        }
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        continuous = bool(request.stream_options and request.stream_options.continuous_usage_stats)
        try:
            async for choice, out in self._merged(choices):
                timing.tokens(len(out.new_token_ids))
                state = states[choice.index]
                delta = state.feed(out.new_text, final=out.finished)
                finish = None
                if out.finished:
                    finish = choice.finish_reason
                    if state.called_tools and finish == "stop":
                        finish = "tool_calls"
                logprobs = None
                if request.logprobs and out.new_token_ids:
                    logprobs = chat_logprobs(
                        self.names, out.new_token_ids, out.new_logprobs, out.new_top_logprobs
                    )
                if not state.sent_role:
                    delta = {"role": "assistant", "content": "", **delta}
                    state.sent_role = True
                elif not delta and finish is None and logprobs is None:
                    continue
                chunk = meta.chunk(
                    "chat.completion.chunk",
                    [
                        {
                            "index": choice.index,
                            "delta": delta,
                            "logprobs": logprobs,
                            "finish_reason": finish,
                        }
                    ],
                )
                if continuous:
                    chunk["usage"] = self._usage(len(prompt_ids), choices)
                yield _sse(chunk)
            if include_usage:
                usage = self._chat_usage(len(prompt_ids), choices, reasoning)
                yield _sse(meta.chunk("chat.completion.chunk", [], usage=usage))
        except Exception as exc:  # headers are sent: report in-band
            yield self._stream_error(exc)
        finally:
            self._release(choices, timing)
        yield SSE_DONE

    # -- completions ------------------------------------------------------------------------

    async def completion(
        self, request: CompletionRequest, prefill_peers: Sequence[str] = ()
    ) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(request.model)
        self._log_unknown(request)
        prompts = [encode_prompt(self.tokenizer, p, self.vocab_size) for p in request.prompts()]
        runs, prompt_texts = [], []
        for prompt_ids in prompts:
            max_tokens = resolve_max_tokens(
                request.max_tokens, len(prompt_ids), self.max_seq_len, "prompt"
            )
            prompt_texts.append(self._decode(prompt_ids) if request.echo else "")
            for i in range(request.n):
                seed = None if request.seed is None else request.seed + i
                runs.append(
                    (
                        prompt_ids,
                        build_params(
                            request,
                            max_tokens=max_tokens,
                            logprobs=request.logprobs,
                            seed=seed,
                            processors=self._processors(request.logit_bias),
                            skip_special_tokens=request.skip_special_tokens,
                        ),
                    )
                )
        timing = _Timing(self.metrics)
        choices = self._open_all(runs, timing, prefill_peers)
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name)
        prompt_tokens = sum(len(p) for p in prompts)
        if request.stream:
            return self._completion_stream(
                request, prompt_tokens, prompt_texts, choices, meta, timing
            )
        try:
            await self._collect(choices, timing)
        finally:
            self._release(choices, timing)
        out = []
        for choice in choices:
            echo = prompt_texts[choice.index // request.n]
            text = "".join(choice.text)
            out.append(
                {
                    "index": choice.index,
                    "text": echo + text,
                    "logprobs": completion_logprobs(
                        self.names, choice.token_ids, choice.logprobs, choice.tops, len(echo)
                    )
                    if request.logprobs is not None
                    else None,
                    "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason,
                }
            )
        return {
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "choices": out,
            "usage": self._usage(prompt_tokens, choices),
            "system_fingerprint": None,
        }

    async def _completion_stream(
        self,
        request: CompletionRequest,
        prompt_tokens: int,
        prompt_texts: list[str],
        choices: list[_Choice],
        meta: _Meta,
        timing: _Timing,
    ) -> AsyncIterator[str]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        offsets = {c.index: len(prompt_texts[c.index // request.n]) for c in choices}
        echoed: set[int] = set()
        try:
            async for choice, out in self._merged(choices):
                timing.tokens(len(out.new_token_ids))
                text = out.new_text
                if request.echo and choice.index not in echoed:
                    text = prompt_texts[choice.index // request.n] + text
                    echoed.add(choice.index)
                if not text and not out.finished and not out.new_token_ids:
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = completion_logprobs(
                        self.names,
                        out.new_token_ids,
                        out.new_logprobs,
                        out.new_top_logprobs,
                        offsets[choice.index],
                    )
                offsets[choice.index] += len(out.new_text)
                yield _sse(
                    meta.chunk(
                        "text_completion",
                        [
                            {
                                "index": choice.index,
                                "text": text,
                                "logprobs": logprobs,
                                "finish_reason": choice.finish_reason if out.finished else None,
                            }
                        ],
                    )
                )
            if include_usage:
                usage = self._usage(prompt_tokens, choices)
                yield _sse(meta.chunk("text_completion", [], usage=usage))
        except Exception as exc:
            yield self._stream_error(exc)
        finally:
            self._release(choices, timing)
        yield SSE_DONE

    def _stream_error(self, exc: Exception) -> str:
        """An error after the headers went out: an in-band `error` event (then [DONE]), which
        the SDK raises as APIError, as vLLM and SGLang do."""
        log.exception("stream failed")
        self.metrics.request_failed(500)
        return _sse(error_body(500, str(exc)))

    # -- tokenizer endpoints ---------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer", param="prompt")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenize(self, request: TokenizeRequest) -> dict[str, Any]:
        self.check_model(request.model)
        if request.messages is not None:
            ids, _ = render_chat(
                self.tokenizer,
                request.messages,
                tools=request.tools,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                template_kwargs=request.chat_template_kwargs,
            )
        else:
            if self.tokenizer is None:
                raise bad_request("this model has no tokenizer", param="prompt")
            assert request.prompt is not None
            ids = list(
                self.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
            )
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_seq_len}

    def detokenize(self, request: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(request.model)
        bad = [t for t in request.tokens if t >= self.vocab_size]
        if bad:
            raise bad_request(
                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "tokens"
            )
        return {"prompt": self._decode(request.tokens)}

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.settings.served_model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "bisllm",
                    "root": self.settings.served_model_name,
                    "parent": None,
                    "max_model_len": self.max_seq_len,
                }
            ],
        }


@dataclass
class _Meta:
    id: str
    created: int
    model: str

    def chunk(
        self, obj: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }


class _ChatStreamState:
    """One streamed choice: text deltas through the reasoning and tool-call parsers."""

    def __init__(
        self,
        serving: OpenAIServing,
        tool_parser: Any,
        reasoning: ReasoningParser | None,
        include_reasoning: bool,
    ) -> None:
        """`tool_parser`: the tool-call parser class for this output, None for plain text."""
        self.reasoning = reasoning.stream() if reasoning else None
        self.include_reasoning = include_reasoning
        self.tools = tool_parser().stream() if tool_parser is not None else None
        self.sent_role = False
        self.called_tools = False
        self.call_ids: dict[int, str] = {}

    def feed(self, text: str, *, final: bool) -> dict[str, Any]:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if final and self.reasoning is not None:
            r_rest, c_rest = self.reasoning.finish()
            reasoning, content = reasoning + r_rest, content + c_rest
        delta: dict[str, Any] = {}
        if self.tools is None:
            pieces: list[Any] = [tool_parsers.ContentDelta(content)] if content else []
        else:
            pieces = self.tools.feed(content) if content else []
            if final:
                pieces += self.tools.finish()
        texts, calls = [], []
        for piece in pieces:
            if isinstance(piece, tool_parsers.ContentDelta):
                texts.append(piece.text)
            elif isinstance(piece, tool_parsers.ReasoningDelta):
                reasoning += piece.text
            elif isinstance(piece, tool_parsers.ToolCallDelta):
                self.called_tools = True
                calls.append(self._call_delta(piece))
        if reasoning and self.include_reasoning:
            delta["reasoning_content"] = delta["reasoning"] = reasoning
        if texts and "".join(texts):
            delta["content"] = "".join(texts)
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _call_delta(self, piece: tool_parsers.ToolCallDelta) -> dict[str, Any]:
        if piece.name is not None:
            call_id = self.call_ids.setdefault(piece.index, f"call_{uuid.uuid4().hex[:24]}")
            return {
                "index": piece.index,
                "id": call_id,
                "type": "function",
                "function": {"name": piece.name, "arguments": piece.arguments},
            }
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
