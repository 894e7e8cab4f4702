"""One generation request as the scheduler tracks it, and what the engine reports back."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bisllm_server.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from bisllm_server.engine.detokenizer import IncrementalDetokenizer
    from bisllm_server.engine.kv_handoff import KVHandoff
    from bisllm_server.engine.scheduler import KVReservation


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """KV bookkeeping, mini-sglang style: `token_ids` is prompt + output so far; the first
    `num_computed` of them have K/V in the pool, addressed through `pages` (position p lives in
    `pages[p // page_size]`). The first `num_tree_pages` pages belong to the radix cache and are
    pinned by locking `cache_node`; the rest belong to this request alone.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    # KV state
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_tree_pages: int = 0
    cache_node: Any = None
    row: int = -1  # row of the runner's page table while running
    num_synced_pages: int = 0  # pages already copied into that row; reset when pages change
    prefill_hit: int = 0  # tokens matched in the prefix cache at the latest admission
    # Disaggregation (kv_handoff.py): K/V of a prompt prefix computed elsewhere, written in at
    # admission instead of prefilling it; the pages reserved for it ahead of the transfer; and,
    # on the prefill side, the page from which K/V is exported when the request finishes.
    kv_import: KVHandoff | None = None
    reservation: KVReservation | None = None
    export_kv_from: int | None = None
    kv_export: KVHandoff | None = None
    # Speculative decoding: the last `num_draft` of `token_ids` are unverified draft tokens.
    # They exist only within one engine step (proposed, scheduled, verified, then removed).
    num_draft: int = 0
    num_draft_tokens: int = 0  # drafted for this request so far
    # A draft model's first draft token for the next step and the draft hidden state it came
    # from (see speculative/drafter.py); None when there is none.
    draft_hint: tuple[int, torch.Tensor] | None = None
    num_accepted_tokens: int = 0  # of which the target model agreed with
    # reporting
    num_cached_tokens: int = 0  # prefix-cache hit when first admitted
    num_retractions: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text: str = ""  # detokenized output (stop string removed once finished)
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def seq_len(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Prefill done: only the last sampled token (and any drafts after it) lacks K/V."""
        return self.num_output_tokens > self.num_draft and self.num_uncomputed == 1 + self.num_draft

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas), plus running totals."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    new_logprobs: list[float | None] = field(default_factory=list)
    new_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    kv: KVHandoff | None = None  # the final output of an `export_kv_from` request


@dataclass
class CompletionOutput:
    """A finished request, as `LLMEngine.generate` returns it."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    num_draft_tokens: int = 0  # speculative decoding: drafted for this request
    num_accepted_tokens: int = 0  # of which accepted
