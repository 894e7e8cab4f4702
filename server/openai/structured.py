"""Grammar-constrained decoding for structured outputs and forced tool calls, on xgrammar.

One `GrammarCompiler` per served model turns a request's `response_format` or forced
`tool_choice` into an xgrammar `CompiledGrammar` (LRU-cached, compiled off the event loop), and
`GrammarCompiler.new_processor` wraps it in a per-request `GrammarLogitsProcessor`: the engine's
LogitsProcessor that masks every token the grammar does not allow at the next step.

JSON is generated compact (no whitespace outside strings): weak or sampled logits otherwise pad
the output with unbounded blank runs (see the API survey, section 4), and compact JSON is what
`json.loads` and every client expect anyway.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
import xgrammar as xgr
from xgrammar.structural_tag import (
    Format,
    GrammarFormat,
    StructuralTag,
    TagFormat,
    TagsWithSeparatorFormat,
)

ToolCallStyle = Literal["hermes", "json"]
TOOL_CALL_STYLES: tuple[str, ...] = ("hermes", "json")

# OpenAI's rule for function names; it also keeps names safe to splice into grammar literals.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:line: "; clients need only the rest.
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
_COMPACT = (",", ":")
# A tool that declares no parameters takes none: its arguments are the empty object.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# Qwen / Hermes tool-call text, exactly as the chat template renders an assistant tool call, so
# the family's normal tool parser reads constrained output like unconstrained output.
_HERMES_BEGIN = '<tool_call>\n{{"name": {name}, "arguments": '
_HERMES_END = "}\n</tool_call>"
_HERMES_SEPARATOR = "\n"

# xgrammar 0.2.9 (issue mlc-ai/xgrammar#800) spells one character of a string with
# minLength/maxLength as [^"\\\r\n]: raw control characters pass, and a TAB in the output makes
# json.loads fail. Such a rule body is rewritten to exclude all C0 controls. It stays one
# character class: an alternation with escapes makes mask filling ~100x slower on a 100k vocab.
# Whole-line matches only, so quoted literals (enum values) are never touched, and a fixed
# xgrammar simply matches nothing.
_BOUNDED_STRING_CHAR = re.compile(r'^(\S+ ::= )\(\(\[\^\\"\\\\\\r\\n\]\)\)$', re.MULTILINE)
_JSON_STRING_CHAR = r'\1(([^\\0-\\x1f\\"\\\\]))'

# (cache key, compile thunk): what every compile method resolves before touching the cache.
_Job = tuple[tuple[str, str], Callable[[], xgr.CompiledGrammar]]


class StructuredOutputError(ValueError):
    """A response_format or tool definition cannot be compiled; the message names what is wrong
    (the server answers HTTP 400 with it)."""


class GrammarTokenRejectedError(RuntimeError):
    """A generated token violates the request's grammar. The mask makes that impossible, so it
    means something bypassed the mask (a bug), and continuing would emit invalid output."""


def _clean(exc: BaseException) -> str:
    return _XGR_PREFIX.sub("", str(exc).strip())


def _canonical(value: object, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=_COMPACT, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StructuredOutputError(f"{what} is not valid JSON: {exc}") from exc


def _compact_json_grammar(schema: dict[str, Any], what: str) -> xgr.Grammar:
    """xgrammar's grammar for `schema`, compact and strict (no properties the schema lacks),
    with length-bounded strings repaired (see _BOUNDED_STRING_CHAR)."""
    try:
        grammar = xgr.Grammar.from_json_schema(
            schema, any_whitespace=False, separators=_COMPACT, strict_mode=True
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise StructuredOutputError(
            f"{what} is not a supported JSON schema: {_clean(exc)}"
        ) from exc
    ebnf, count = _BOUNDED_STRING_CHAR.subn(_JSON_STRING_CHAR, str(grammar))
    if not count:
        return grammar
    try:
        return xgr.Grammar.from_ebnf(ebnf)
    except RuntimeError:
        # Should xgrammar ever print EBNF it cannot re-read, serve its own grammar: a control
        # character in a bounded string is rarer and milder than refusing the request.
        return grammar


def _tool_functions(tools: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters schema) of each tool, validated. Accepts the OpenAI request shape
    `{"type": "function", "function": {...}}` and the bare function object."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise StructuredOutputError("tools must be a non-empty list when a tool call is required")
    functions: list[tuple[str, dict[str, Any]]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise StructuredOutputError(f"tools[{i}].function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise StructuredOutputError(
                f"tools[{i}].function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -, got {name!r}"
            )
        if any(name == seen for seen, _ in functions):
            raise StructuredOutputError(f"tools[{i}].function.name {name!r} is defined twice")
        params = fn.get("parameters")
        if params is None:
            params = _NO_PARAMETERS
        elif not isinstance(params, dict):
            raise StructuredOutputError(
                f"tools[{i}].function.parameters must be a JSON schema object"
            )
        functions.append((name, params))
    return functions


class GrammarLogitsProcessor:
    """Per-request grammar mask, called by the engine once per decoding step on its stepping
    thread with (output ids so far, this row's logits [V]).

    Each call first feeds the matcher the ids it has not seen (the engine appends one per step;
    a shorter history means tokens were rolled back), then sets every logit the grammar forbids
    next to -inf. Once the grammar is complete xgrammar allows only stop tokens, so the engine
    ends the request with finish_reason "stop". Ids at or beyond the tokenizer's vocabulary
    (padded lm_head rows) are never allowed.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        # The same memory as bytes: bit j of byte i is token 8 * i + j (little-endian words).
        self._bitmask_bytes = self._bitmask.numpy().view(np.uint8).reshape(-1)
        self._stop_ids = frozenset(self._matcher.stop_token_ids)
        self._stop_index = torch.tensor(sorted(self._stop_ids), dtype=torch.long)
        self._seen = 0
        self._device_bitmask: torch.Tensor | None = None

    @property
    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return self._matcher.is_terminated()

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(output_ids)
        if self._matcher.is_terminated():
            return self._only_stop_tokens(logits)
        width = logits.shape[-1]
        if width > self._vocab_size:
            logits[self._vocab_size :] = -math.inf
        if not self._matcher.fill_next_token_bitmask(self._bitmask):
            return logits  # every token allowed: nothing to apply
        n = min(width, self._vocab_size)
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            # numpy's masked copy beats xgrammar's CPU kernel up to ~7x when few tokens are
            # allowed (JSON punctuation, enums) and matches it when most are (string bodies).
            allowed = np.unpackbits(self._bitmask_bytes, count=n, bitorder="little")
            np.copyto(logits.numpy()[:n], -np.inf, where=allowed == 0)
            return logits
        return self._apply_torch(logits, n)

    def _advance(self, output_ids: Sequence[int]) -> None:
        n = len(output_ids)
        if n < self._seen:
            # Rejected draft tokens were dropped from the history: forget them here too.
            self._matcher.rollback(self._seen - n)
            self._seen = n
        for pos in range(self._seen, n):
            token = int(output_ids[pos])
            if self._matcher.accept_token(token):
                continue
            # A terminated matcher refuses every token; more stop tokens (ignore_eos) are fine.
            if not (self._matcher.is_terminated() and token in self._stop_ids):
                raise GrammarTokenRejectedError(
                    f"output token {token} at position {pos} is not allowed by the request's grammar"
                )
        self._seen = n

    def _only_stop_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        index = self._stop_index[self._stop_index < logits.shape[-1]].to(logits.device)
        kept = logits[index]
        logits.fill_(-math.inf)
        logits[index] = kept
        return logits

    def _apply_torch(self, logits: torch.Tensor, n: int) -> torch.Tensor:
        """The mask on an accelerator (or a non-fp32 / strided CPU row): xgrammar's plain torch
        kernel, which needs no JIT compiler, on a device copy of the bitmask kept across steps."""
        if self._device_bitmask is None or self._device_bitmask.device != logits.device:
            self._device_bitmask = torch.empty_like(self._bitmask, device=logits.device)
        self._device_bitmask.copy_(self._bitmask, non_blocking=True)
        row = logits.unsqueeze(0)
        xgr.apply_token_bitmask_inplace(
            row,
            self._device_bitmask,
            vocab_size=n,
            backend="torch_native",
        )
        return logits


class GrammarCompiler:
    """Compiles request grammars for one served model, with an LRU cache of compiled grammars.

    `vocab_size` is the model's logits width (which may exceed the tokenizer's vocabulary);
    `stop_token_ids` should be the engine's eos ids, so the tokens a complete grammar allows are
    the ones that end the request. Every compile method has an `a`-prefixed async twin that
    compiles on a small thread pool, so a slow schema never blocks the event loop.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        max_threads: int = 2,
        cache_size: int = 256,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        stops = sorted(set(stop_token_ids)) if stop_token_ids else None
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops
        )
        # xgrammar's own cache is unbounded by default; ours is bounded and keyed canonically.
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=max_threads, cache_enabled=False
        )
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._max_threads = max_threads
        self._executor: ThreadPoolExecutor | None = None
        self.hits = 0
        self.misses = 0

    # -- compile (sync) -----------------------------------------------------------------

    def json_schema(self, schema: dict[str, Any]) -> xgr.CompiledGrammar:
        """Grammar for `response_format: {"type": "json_schema"}`: compact, strict JSON."""
        return self._get(*self._json_schema_job(schema))

    def json_object(self) -> xgr.CompiledGrammar:
        """Grammar for `response_format: {"type": "json_object"}`: any compact JSON object."""
        return self._get(*self._json_object_job())

    def tool_calls(
        self,
        tools: Sequence[dict[str, Any]],
        *,
        required_name: str | None = None,
        parallel: bool = True,
        style: ToolCallStyle = "hermes",
    ) -> xgr.CompiledGrammar:
        """Grammar for `tool_choice` "required" (`required_name` None: at least one call to any
        tool, exactly one unless `parallel`) or a named function (exactly one call to it).

        style "hermes": `<tool_call>\\n{"name": "<name>", "arguments": <args>}\\n</tool_call>`
        blocks separated by "\\n" (Hermes / Qwen chat templates). style "json": a JSON array
        of `{"name", "parameters"}` objects (families without a template tool-call format).
        """
        return self._get(*self._tool_calls_job(tools, required_name, parallel, style))

    # -- compile (async) ----------------------------------------------------------------

    async def ajson_schema(self, schema: dict[str, Any]) -> xgr.CompiledGrammar:
        """`json_schema`, compiled off the event loop (a cache hit returns at once)."""
        return await self._aget(*self._json_schema_job(schema))

    async def ajson_object(self) -> xgr.CompiledGrammar:
        """`json_object`, compiled off the event loop (a cache hit returns at once)."""
        return await self._aget(*self._json_object_job())

    async def atool_calls(
        self,
        tools: Sequence[dict[str, Any]],
        *,
        required_name: str | None = None,
        parallel: bool = True,
        style: ToolCallStyle = "hermes",
    ) -> xgr.CompiledGrammar:
        """`tool_calls`, compiled off the event loop (a cache hit returns at once)."""
        return await self._aget(*self._tool_calls_job(tools, required_name, parallel, style))

    # -- processors and lifecycle ---------------------------------------------------------

    def new_processor(self, compiled: xgr.CompiledGrammar) -> GrammarLogitsProcessor:
        """A fresh matcher for one request (or one choice of an n > 1 request): matchers hold
        per-sequence state, compiled grammars are shared."""
        return GrammarLogitsProcessor(compiled, self.vocab_size)

    def close(self) -> None:
        """Stop the compile threads (pending compiles finish first)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    # -- jobs: validation and cache keys are cheap and run on the caller's thread -----------

    def _json_schema_job(self, schema: dict[str, Any]) -> _Job:
        if not isinstance(schema, dict):
            raise StructuredOutputError(
                f"response_format.json_schema.schema must be a JSON object, got {type(schema).__name__}"
            )
        key = ("json_schema", _canonical(schema, "response_format.json_schema.schema"))

        def build() -> xgr.CompiledGrammar:
            grammar = _compact_json_grammar(schema, "response_format.json_schema.schema")
            return self._compiler.compile_grammar(grammar)

        return key, build

    def _json_object_job(self) -> _Job:
        def build() -> xgr.CompiledGrammar:
            return self._compiler.compile_grammar(
                _compact_json_grammar({"type": "object"}, "json_object")
            )

        return ("json_object", ""), build

    def _tool_calls_job(
        self,
        tools: Sequence[dict[str, Any]],
        required_name: str | None,
        parallel: bool,
        style: str,
    ) -> _Job:
        if style not in TOOL_CALL_STYLES:
            raise StructuredOutputError(
                f"tool-call style must be one of {list(TOOL_CALL_STYLES)}, got {style!r}"
            )
        functions = _tool_functions(tools)
        if required_name is not None:
            functions = [f for f in functions if f[0] == required_name]
            if not functions:
                raise StructuredOutputError(
                    f"tool_choice names function {required_name!r}, which is not in tools"
                )
        single = required_name is not None or not parallel
        # Only names and parameter schemas shape the grammar; descriptions stay out of the key.
        spec = {"functions": functions, "single": single, "style": style}
        key = ("tool_calls", _canonical(spec, "tools"))
        if style == "hermes":
            return key, lambda: self._compile_hermes(functions, single)
        return key, lambda: self._compile_json_calls(functions, single)

    # -- builders (run on a compile thread when called through the async API) --------------

    def _compile_hermes(
        self, functions: list[tuple[str, dict[str, Any]]], single: bool
    ) -> xgr.CompiledGrammar:
        """Tool-call blocks whose arguments follow each tool's schema. Each schema becomes
        compact EBNF (the structural tag's own JSON format allows free whitespace), placed
        between the literal text the template renders around the arguments."""
        tags: list[TagFormat] = []
        for i, (name, params) in enumerate(functions):
            args = _compact_json_grammar(params, f"tools[{i}].function.parameters ({name})")
            tags.append(
                TagFormat(
                    begin=_HERMES_BEGIN.format(name=json.dumps(name)),
                    content=GrammarFormat(grammar=str(args)),
                    end=_HERMES_END,
                )
            )
        fmt: Format
        if single and len(tags) == 1:
            fmt = tags[0]
        else:
            fmt = TagsWithSeparatorFormat(
                tags=tags, separator=_HERMES_SEPARATOR, at_least_one=True, stop_after_first=single
            )
        try:
            return self._compiler.compile_structural_tag(StructuralTag(format=fmt))
        except (RuntimeError, ValueError) as exc:
            raise StructuredOutputError(f"tools cannot be compiled: {_clean(exc)}") from exc

    def _compile_json_calls(
        self, functions: list[tuple[str, dict[str, Any]]], single: bool
    ) -> xgr.CompiledGrammar:
        """A JSON array (1 item when `single`) of `{"name": <tool>, "parameters": <args>}`."""
        calls = [
            {
                "type": "object",
                "properties": {"name": {"enum": [name]}, "parameters": params},
                "required": ["name", "parameters"],
            }
            for name, params in functions
        ]
        schema: dict[str, Any] = {
            "type": "array",
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            "minItems": 1,
        }
        if single:
            schema["maxItems"] = 1
        try:
            grammar = _compact_json_grammar(schema, "tools")
        except StructuredOutputError:
            # Name the culprit: convert each tool's schema alone (only on this error path).
            for i, (name, params) in enumerate(functions):
                _compact_json_grammar(params, f"tools[{i}].function.parameters ({name})")
            raise
        return self._compiler.compile_grammar(grammar)

    # -- cache --------------------------------------------------------------------------

    def _lookup(self, key: tuple[str, str]) -> xgr.CompiledGrammar | None:
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return compiled

    def _store(self, key: tuple[str, str], compiled: xgr.CompiledGrammar) -> xgr.CompiledGrammar:
        with self._lock:
            # Two concurrent misses may both compile; keep the first so callers share one object.
            compiled = self._cache.setdefault(key, compiled)
            self._cache.move_to_end(key)
            self.misses += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return compiled

    def _get(
        self, key: tuple[str, str], build: Callable[[], xgr.CompiledGrammar]
    ) -> xgr.CompiledGrammar:
        compiled = self._lookup(key)
        return compiled if compiled is not None else self._store(key, build())

    async def _aget(
        self, key: tuple[str, str], build: Callable[[], xgr.CompiledGrammar]
    ) -> xgr.CompiledGrammar:
        compiled = self._lookup(key)
        if compiled is not None:
            return compiled
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._max_threads, thread_name_prefix="grammar-compile"
                )
            executor = self._executor
        built = await asyncio.get_running_loop().run_in_executor(executor, build)
        return self._store(key, built)
