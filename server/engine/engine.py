"""`LLMEngine`: add / step / abort over the scheduler, model runner and sampler.

One `step()` schedules a batch, runs one forward, samples the requests whose chunk reached
their last token, applies stop conditions and returns per-request deltas. `add_request` and
`abort` may be called from any thread (the async server does): they go through an inbox that
`step()` drains, so the scheduler itself is only touched by the stepping thread.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bisllm_server.engine import cpu_kernels
from bisllm_server.engine.attention import AttentionBackend, TorchAttentionBackend
from bisllm_server.engine.config import EngineConfig, EngineConfigError
from bisllm_server.engine.cpu_kernels.backends import CpuAttentionBackend, CpuExpertsBackend
from bisllm_server.engine.detokenizer import IncrementalDetokenizer
from bisllm_server.engine.kv_cache import (
    KVPool,
    PageAllocator,
    bytes_per_page,
    kv_budget_bytes,
    pages_for_budget,
)
from bisllm_server.engine.kv_handoff import KVHandoff
from bisllm_server.engine.layers.moe import set_experts_backend
from bisllm_server.engine.loader import ModelConfig, load_model
from bisllm_server.engine.model_runner import CausalModel, ModelRunner
from bisllm_server.engine.models.decoder import DecoderForCausalLM
from bisllm_server.engine.parallel.expert_balancer import ExpertBalancer
from bisllm_server.engine.parallel.kv_shards import gather_kv_heads, local_kv_heads
from bisllm_server.engine.parallel.lockstep import (
    MirroredRequest,
    StepChoices,
    StepFollower,
    StepInputs,
    StepLeader,
    check_digest,
    mirrored_params,
)
from bisllm_server.engine.parallel.tensor_parallel import SINGLE, TPGroup
from bisllm_server.engine.radix_cache import RadixCache
from bisllm_server.engine.request import CompletionOutput, Request, RequestOutput
from bisllm_server.engine.sampling import (
    NoAllowedTokenError,
    SampleOutput,
    Sampler,
    SamplingParams,
    SamplingRow,
    unedited,
)
from bisllm_server.engine.scheduler import KVReservation, ScheduledBatch, Scheduler
from bisllm_server.engine.speculative.draft_model import DraftModel
from bisllm_server.engine.speculative.drafter import ModelDrafter
from bisllm_server.engine.speculative.eagle import EagleCheckpointError, load_eagle_head
from bisllm_server.engine.speculative.mtp import MtpDraft, MtpUnavailableError
from bisllm_server.engine.speculative.ngram import NGramProposer
from bisllm_server.engine.stats import EngineStats
from bisllm_server.kv_events import KVEventPublisher


class RequestError(ValueError):
    """A request the engine cannot serve; the message names the field and the limit."""


_LOAD_TOKENIZER = object()


def load_tokenizer(model_dir: str | Path) -> Any | None:
    """The checkpoint's tokenizer, or None when the directory ships none (token-id prompts only)."""
    path = Path(model_dir)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        model: CausalModel | None = None,
        model_config: ModelConfig | None = None,
        tokenizer: Any = _LOAD_TOKENIZER,
        attention: type[AttentionBackend] = TorchAttentionBackend,
        tp: TPGroup = SINGLE,
        lockstep: StepLeader | StepFollower | None = None,
    ) -> None:
        """`tp`: this rank's tensor-parallel group. Every rank of it runs an engine over its
        shard of the model, fed the same requests in the same order; the logits are gathered
        on every rank, so all of them schedule and sample alike. `lockstep` (serving, see
        parallel/lockstep.py): the leader shares each step's inbox and choices with its
        followers, which take theirs from it instead of from callers and the sampler."""
        config.validate()
        if tp.size > 1 and config.speculative_method in ("eagle", "mtp"):
            raise EngineConfigError(
                f"speculative_method {config.speculative_method!r} with tensor parallelism is "
                "not supported yet (the draft model is not split); use 'ngram' or one rank"
            )
        self.config = config
        self.tp = tp
        self.lockstep = lockstep
        self.lockstep_stopped = False  # a follower whose leader said stop
        if model is None:
            loaded = load_model(
                config.model,
                dtype=config.dtype,
                device=config.device,
                tp=tp,
                num_redundant_experts=config.ep_num_redundant_experts,
            )
            model, model_config = loaded.model, loaded.config
        assert model_config is not None, "model_config is required with an explicit model"
        self.model_config = model_config
        # A K/V handoff carries every KV head (kv_shards.py), whatever either side's TP size.
        self._handoff_heads = (
            model_config.kv_heads_total
            if model_config.kv_heads_sharded
            else model_config.num_kv_heads
        )
        self.tokenizer = load_tokenizer(config.model) if tokenizer is _LOAD_TOKENIZER else tokenizer
        self.device = torch.device(config.device)
        self.page_size = config.page_size
        self.max_seq_len = config.max_seq_len or model_config.max_position_embeddings
        self.eos_token_ids = frozenset(model_config.eos_token_ids)

        # Expert-parallel load balancing: on a model sharded with expert parallelism.
        self.balancer = (
            ExpertBalancer(model, model.tp_slices, tp, interval=config.eplb_rebalance_interval)
            if tp.ep_size > 1 and config.eplb_rebalance_interval and isinstance(model, nn.Module)
            else None
        )
        draft = self._load_draft_model(model)
        num_pages = config.num_kv_pages or self._pages_for_budget(draft)
        self.kv_pool = KVPool(
            model_config.num_layers,
            model_config.num_kv_heads,
            model_config.head_dim,
            num_pages,
            config.page_size,
            model_config.dtype,
            self.device,
            v_head_dim=model_config.kv_value_dim,
            shared_kv=model_config.kv_shared,
        )
        # The draft's K/V: a pool of its own over the same pages, so every slot the target
        # writes has a draft twin and no separate accounting is needed.
        self.draft_kv_pool = (
            KVPool(
                draft.num_kv_layers,
                draft.kv_layout.num_kv_heads,
                draft.kv_layout.head_dim,
                num_pages,
                config.page_size,
                model_config.dtype,
                self.device,
                v_head_dim=draft.kv_layout.v_head_dim,
                shared_kv=draft.kv_layout.shared_kv,
            )
            if draft is not None
            else None
        )
        self.allocator = PageAllocator(num_pages)
        self.kv_events = KVEventPublisher()
        self.cache = (
            RadixCache(config.page_size, self.allocator, self.kv_events)
            if config.enable_prefix_caching
            else None
        )
        self.scheduler = Scheduler(
            allocator=self.allocator,
            cache=self.cache,
            page_size=config.page_size,
            max_batch_size=config.max_batch_size,
            max_num_tokens=config.max_num_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
            schedule_policy=config.schedule_policy,
        )
        if config.cpu_kernels and self.device.type == "cpu" and cpu_kernels.available():
            if isinstance(model, torch.nn.Module):
                set_experts_backend(model, CpuExpertsBackend())
            if attention is TorchAttentionBackend:
                attention = CpuAttentionBackend
        self.runner = ModelRunner(
            model,
            attention(self.kv_pool.k_buffers, self.kv_pool.v_buffers),
            page_size=config.page_size,
            max_rows=config.max_batch_size,
            max_pages_per_seq=-(-self.max_seq_len // config.page_size),
            device=self.device,
        )
        self.sampler = Sampler(seed=config.seed)
        self.proposer = (
            NGramProposer(config.num_draft_tokens, config.ngram_min, config.ngram_max)
            if config.speculative_method == "ngram"
            else None
        )
        self.drafter = (
            ModelDrafter(
                draft,
                attention(self.draft_kv_pool.k_buffers, self.draft_kv_pool.v_buffers),
                self.runner,
                config.num_draft_tokens,
            )
            if draft is not None and self.draft_kv_pool is not None
            else None
        )
        self._spec = {"drafted": 0, "accepted": 0, "verified": 0}

        self._requests: dict[str, Request] = {}
        # Pages set aside by reserve_kv for requests whose prompt K/V is on its way.
        self._reservations: dict[str, KVReservation] = {}
        # Finished requests that `generate` waits for; streaming callers only get the deltas.
        self._collect: dict[str, Request | None] = {}
        self._inbox: list[tuple[str, Any]] = []
        self._inbox_lock = threading.Lock()
        self._arrivals = itertools.count()
        self._ids = itertools.count()
        self._step = 0
        self._totals = {"prompt": 0, "generation": 0, "cached": 0, "finished": 0}
        self.stats = self._snapshot(ScheduledBatch(), 0, 0.0, 0.0, 0.0)

    def _load_draft_model(self, model: CausalModel) -> DraftModel | None:
        """The draft model of speculative_method "eagle" or "mtp", on the target's device."""
        method = self.config.speculative_method
        if method not in ("eagle", "mtp"):
            return None
        if not isinstance(model, DecoderForCausalLM):
            raise EngineConfigError(
                f"speculative_method {method!r} needs the target's hidden states: the model "
                f"must be a DecoderForCausalLM, got {type(model).__name__}"
            )
        try:
            if method == "mtp":
                return MtpDraft(model)
            assert self.config.speculative_model is not None  # validate() checked
            return load_eagle_head(
                self.config.speculative_model, model, self.model_config.dtype, self.device
            )
        except (MtpUnavailableError, EagleCheckpointError) as exc:
            raise EngineConfigError(str(exc)) from exc

    def _pages_for_budget(self, draft: DraftModel | None) -> int:
        """KV pages that fit the configured budget, counting the draft's pool when there is one."""
        mc, config = self.model_config, self.config
        budget = kv_budget_bytes(
            self.device,
            cpu_bytes=config.kv_cache_bytes,
            gpu_memory_fraction=config.gpu_memory_fraction,
        )
        if draft is not None:
            # Reserve for the draft's pool in proportion: each page has a twin there.
            layout = draft.kv_layout
            target_page = bytes_per_page(
                mc.num_layers,
                mc.num_kv_heads,
                mc.head_dim,
                config.page_size,
                mc.dtype,
                v_head_dim=mc.kv_value_dim,
                shared_kv=mc.kv_shared,
            )
            draft_page = bytes_per_page(
                draft.num_kv_layers,
                layout.num_kv_heads,
                layout.head_dim,
                config.page_size,
                mc.dtype,
                v_head_dim=layout.v_head_dim,
                shared_kv=layout.shared_kv,
            )
            budget = budget * target_page // (target_page + draft_page)
        return pages_for_budget(
            budget,
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            config.page_size,
            mc.dtype,
            v_head_dim=mc.kv_value_dim,
            shared_kv=mc.kv_shared,
        )

    # -- public API ---------------------------------------------------------------------

    @property
    def num_kv_pages(self) -> int:
        return self.kv_pool.num_pages

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        detokenize: bool = True,
        export_kv_from: int | None = None,
        kv: KVHandoff | None = None,
    ) -> str:
        """Queue a request (thread-safe); it joins the batch at the next step.

        Disaggregation (kv_handoff.py): with `export_kv_from=k` the final output carries the
        K/V of the prompt's pages k.. as `RequestOutput.kv` (the prefill side); `kv` starts
        the request from the K/V of a prefix of `prompt` computed elsewhere (the decode side),
        into the pages `reserve_kv` set aside under the same request_id, if any."""
        req = self.make_request(prompt, params, request_id=request_id, detokenize=detokenize)
        req.export_kv_from = export_kv_from
        self.submit(req, kv=kv)
        return req.request_id

    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        detokenize: bool = True,
    ) -> Request:
        """A validated request, not queued yet (RequestError says what is wrong with it)."""
        return self._make_request(prompt, params or SamplingParams(), request_id, detokenize)

    def submit(self, req: Request, *, kv: KVHandoff | None = None) -> None:
        """Queue a request from `make_request` (thread-safe)."""
        if kv is not None:
            self._accept_handoff(req, kv)
        with self._inbox_lock:
            if req.request_id in self._requests or any(
                kind == "add" and item.request_id == req.request_id for kind, item in self._inbox
            ):
                raise RequestError(f"request_id {req.request_id!r} is already in use")
            self._inbox.append(("add", req))

    def reserve_kv(self, request_id: str, prompt_ids: Sequence[int]) -> int | None:
        """Set pages aside for a request whose prompt K/V will be prefilled elsewhere: before
        the transfer, so that the K/V has a place to land. Returns how many leading pages the
        local prefix cache already holds (the prefill side need not send those), or None if
        there is no room. The reservation is used by `add_request(..., kv=...,
        request_id=request_id)` and given back by `abort(request_id)`. Call it between steps
        (from the stepping thread; from others, `reserve_kv_later`)."""
        if request_id in self._reservations or request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in use")
        # The prefix is the prompt less its last token, as the prefill side computes it; the
        # pages cover the whole prompt, whose last token is computed here.
        reservation = self.scheduler.reserve(prompt_ids[:-1], len(prompt_ids))
        if reservation is None:
            return None
        self._reservations[request_id] = reservation
        self.stats = self._snapshot(ScheduledBatch(), 0, 0.0, 0.0, 0.0)  # pages changed
        return reservation.num_matched_pages

    def reserve_kv_later(
        self, request_id: str, prompt_ids: Sequence[int]
    ) -> concurrent.futures.Future:
        """`reserve_kv` at the next step (thread-safe); its result lands in the future. A
        lockstep leader's followers make the same reservation."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._inbox_lock:
            self._inbox.append(("reserve", (request_id, list(prompt_ids), future)))
        return future

    def fail_reservations(self, exc: BaseException) -> None:
        """Fail every `reserve_kv_later` not run yet (the stepping thread is gone)."""
        with self._inbox_lock:
            pending = [item for kind, item in self._inbox if kind == "reserve"]
            self._inbox = [(k, item) for k, item in self._inbox if k != "reserve"]
        for _, _, future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    def _accept_handoff(self, req: Request, kv: KVHandoff) -> None:
        kv.validate()
        if not 0 < kv.num_tokens < req.num_prompt_tokens:
            raise RequestError(
                f"kv: the handoff holds {kv.num_tokens} tokens; it must be a proper prefix of "
                f"the {req.num_prompt_tokens}-token prompt (at least the last token is "
                "computed here)"
            )
        if kv.prompt_ids != req.prompt_ids[: kv.num_tokens]:
            raise RequestError("kv: the handoff was prefilled from a different prompt")
        if kv.page_size != self.page_size:
            raise RequestError(
                f"kv: page_size {kv.page_size} differs from this engine's {self.page_size}"
            )
        pool = self.kv_pool
        expected = (pool.num_layers, 1 if pool.shared_kv else 2, pool.page_size)
        expected += (self._handoff_heads, pool.head_dim)
        if (kv.data.shape[0], kv.data.shape[1], *kv.data.shape[3:]) != expected:
            raise RequestError(
                f"kv: K/V layout {tuple(kv.data.shape)} does not match this model's cache"
            )
        req.kv_import = kv

    def _import_handoffs(self, batch: ScheduledBatch) -> None:
        """Write the K/V of handed-off requests admitted this step into their pages (those
        the local prefix cache did not already provide); they then compute the rest."""
        for req, _ in batch.items:
            kv = req.kv_import
            if kv is None:
                continue
            first = req.num_tree_pages  # whole pages matched locally (admission checked
            # that the handoff starts at or before them)
            if kv.num_pages > first:
                data = kv.data[:, :, first - kv.start_page :]
                if self.model_config.kv_heads_sharded:
                    data = local_kv_heads(data, self.tp, self.model_config.kv_heads_total)
                self.kv_pool.import_pages(req.pages[first : kv.num_pages], data.to(self.device))
            req.kv_import = None

    def _export_kv(self, req: Request) -> KVHandoff:
        """The K/V of a finished request's prompt, from page `export_kv_from` on."""
        pages = -(-req.num_prompt_tokens // self.page_size)
        start = min(req.export_kv_from or 0, pages)
        data = self.kv_pool.export_pages(req.pages[start:pages])
        if self.model_config.kv_heads_sharded:
            # A collective: every rank finishes the request in the same step.
            data = gather_kv_heads(data, self.tp, self.model_config.kv_heads_total)
        return KVHandoff(
            prompt_ids=list(req.prompt_ids),
            page_size=self.page_size,
            data=data,
            start_page=start,
        )

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV at the next step (thread-safe; unknown ids ignored)."""
        with self._inbox_lock:
            self._inbox.append(("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        with self._inbox_lock:
            return bool(self._inbox) or self.scheduler.num_unfinished > 0

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        outputs = self._drain_inbox()
        if self.lockstep_stopped:
            return outputs
        drafted = self._propose_drafts()
        batch = self.scheduler.schedule()
        self._import_handoffs(batch)
        self._fit_drafts(batch, drafted)
        if self.drafter is not None:
            self.drafter.chain(drafted)
        decode_tokens = sum(n for req, n in batch.items if req.is_decoding)
        schedule_seconds = forward_seconds = 0.0
        if batch:
            fb, sampled, spans = self.runner.prepare(batch)
            # Where each item starts, for the draft model's pass after sampling.
            items, capture = [], None
            if self.drafter is not None:
                items = [(req, req.num_computed, n) for req, n in batch.items]
                capture = self.drafter.capture()
            forward_start = time.perf_counter()
            schedule_seconds = forward_start - start
            logits = self.runner.forward(fb, capture)
            forward_seconds = time.perf_counter() - forward_start
            # Requests verifying drafts own several logits rows; the rest one each.
            verifying: list[tuple[Request, torch.Tensor]] = []
            plain: list[int] = []
            plain_rows: list[int] = []
            row = 0
            for i, span in zip(sampled, spans, strict=True):
                req = batch.items[i][0]
                if req.num_draft:
                    verifying.append((req, logits[row : row + span]))
                else:
                    plain.append(i)
                    plain_rows.append(row)
                row += span
            if verifying:
                logits = logits[torch.tensor(plain_rows, dtype=torch.long, device=logits.device)]
            result, dead, verified = self._choose(
                logits, [batch.items[i][0] for i in plain], verifying
            )
            self.scheduler.after_forward(batch)
            if self.balancer is not None:
                self.balancer.after_forward()  # may move expert slots, between two steps
            for j in dead:
                req = batch.items[plain[j]][0]
                req.finish_reason, req.stop_reason = "abort", "no token allowed by its constraints"
                self._finish(req)
                outputs.append(self._output(req, 0, ""))
            plain = [i for j, i in enumerate(plain) if j not in dead]
            if result is not None:
                for slot, i in enumerate(plain):
                    req = batch.items[i][0]
                    outputs.append(
                        self._append_token(
                            req,
                            result.token_ids[slot],
                            result.logprobs[slot],
                            result.top_logprobs[slot],
                        )
                    )
            for (req, _), predicted in zip(verifying, verified, strict=True):
                outputs.extend(self._verify(req, predicted))
            if self.drafter is not None and capture is not None:
                self.drafter.extend(fb, items, capture)
        elif self.tp.dp_attention:
            # Another rank of the DP-attention group has a batch: join its collectives.
            self.runner.model.idle_forward()  # type: ignore[attr-defined]
            if self.balancer is not None:
                self.balancer.after_forward()
        self._step += 1
        self.stats = self._snapshot(
            batch, decode_tokens, time.perf_counter() - start, schedule_seconds, forward_seconds
        )
        return outputs

    # -- speculative decoding -------------------------------------------------------------

    def _speculates(self, req: Request) -> bool:
        """Verification needs each position's next-token distribution from its logits alone:
        requests without penalties, logits processors, banned tokens or logprobs (greedy or
        sampled). Others in the same batch decode one token at a time."""
        return req.is_decoding and unedited(self._sampling_row(req))

    def _propose_drafts(self) -> list[Request]:
        """Append drafts to the decoding requests that speculate (removed again this step)."""
        if self.proposer is None and self.drafter is None:
            return []
        drafted = []
        for req in self.scheduler.running:
            if not self._speculates(req):
                continue
            # A step yields the accepted drafts plus one token: stay within max_tokens and
            # max_seq_len even when every draft is accepted.
            room = min(
                req.params.max_tokens - req.num_output_tokens, self.max_seq_len - req.seq_len
            )
            if self.drafter is not None:
                draft = self.drafter.propose(req, room - 1)
            else:
                assert self.proposer is not None
                draft = self.proposer.propose(req.token_ids, room - 1)
            if draft:
                req.token_ids.extend(draft)
                req.num_draft = len(draft)
                drafted.append(req)
        return drafted

    def _fit_drafts(self, batch: ScheduledBatch, drafted: list[Request]) -> None:
        """Drop the drafts the scheduler did not give room to: all of them for a request left
        out of the batch (or retracted), the tail for one whose chunk was cut by the budget."""
        if not drafted:
            return
        scheduled = {id(req): n for req, n in batch.items}
        for req in drafted:
            keep = min(req.num_draft, scheduled.get(id(req), 1) - 1)
            if keep < req.num_draft:
                del req.token_ids[len(req.token_ids) - (req.num_draft - keep) :]
                req.num_draft = keep

    def _choose(
        self,
        logits: torch.Tensor,
        plain: list[Request],
        verifying: list[tuple[Request, torch.Tensor]],
    ) -> tuple[SampleOutput | None, set[int], list[list[int]]]:
        """The step's choices: the plain rows' sampled tokens (with the rows no token was
        allowed for) and the tokens each draft verification keeps. A lockstep leader shares
        them; a follower takes the leader's instead of sampling."""
        if isinstance(self.lockstep, StepFollower):
            choices = self.lockstep.receive_choices()
            return choices.sampled, set(choices.dead), choices.verified
        result, dead = self._sample(logits, [self._sampling_row(req) for req in plain])
        verified = [self._predict(req, draft_logits) for req, draft_logits in verifying]
        if isinstance(self.lockstep, StepLeader):
            self.lockstep.publish_choices(StepChoices(result, frozenset(dead), verified))
        return result, dead, verified

    def _predict(self, req: Request, logits: torch.Tensor) -> list[int]:
        """Row i of `logits` is the target's next-token distribution after the request's i-th
        uncomputed token (its last real token, then each draft); the sampler decides which
        drafts stand and the token after them (`Sampler.verify_drafts`)."""
        drafts = req.token_ids[req.seq_len - req.num_draft :]
        return self.sampler.verify_drafts(logits, drafts, self._sampling_row(req))

    def _verify(self, req: Request, predicted: list[int]) -> list[RequestOutput]:
        """Keep the drafts that `predicted` confirms and the token after them. Rejected drafts
        leave `token_ids`, and the pages only they needed go back to the pool."""
        k = req.num_draft
        base = req.seq_len - k
        accepted = len(predicted) - 1
        del req.token_ids[base:]
        req.num_draft = 0
        req.num_computed = base  # through the last real token; accepted drafts follow
        req.num_draft_tokens += k
        req.num_accepted_tokens += accepted
        self._spec["drafted"] += k
        self._spec["accepted"] += accepted
        self._spec["verified"] += 1
        outputs = []
        for i, token in enumerate(predicted):
            if i:
                req.num_computed += 1  # the previous token is an accepted draft: K/V is valid
            outputs.append(self._append_token(req, token, None, None))
            if req.finished:
                return outputs
        self.scheduler.trim_pages(req)
        return outputs

    def _sample(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[SampleOutput | None, set[int]]:
        """Sample every row; rows whose constraints allow no token are reported, not fatal."""
        if not rows:
            return None, set()
        try:
            return self.sampler.sample(logits, rows), set()
        except NoAllowedTokenError as exc:
            dead = set(exc.rows)
        keep = [j for j in range(len(rows)) if j not in dead]
        if not keep:
            return None, dead
        return self.sampler.sample(logits[keep], [rows[j] for j in keep]), dead

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        detokenize: bool = True,
        progress: bool = False,
    ) -> list[CompletionOutput]:
        """Run prompts to completion (offline use); results in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, params, strict=True):
                ids.append(f"gen-{next(self._ids)}")
                self._collect[ids[-1]] = None
                self.add_request(prompt, sp, request_id=ids[-1], detokenize=detokenize)
        except RequestError:
            # All or nothing: a bad prompt leaves none of this call's requests queued.
            for queued in ids:
                self.abort(queued)
                self._collect.pop(queued)
            raise
        remaining = set(ids)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        while remaining:
            for out in self.step():
                if out.finished and out.request_id in remaining:
                    remaining.discard(out.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        results = []
        for rid in ids:
            req = self._collect.pop(rid)
            assert req is not None
            results.append(
                CompletionOutput(
                    request_id=rid,
                    prompt_ids=req.prompt_ids,
                    token_ids=req.output_ids,
                    text=req.text,
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                    num_cached_tokens=req.num_cached_tokens,
                    logprobs=req.logprobs,
                    top_logprobs=req.top_logprobs,
                    num_draft_tokens=req.num_draft_tokens,
                    num_accepted_tokens=req.num_accepted_tokens,
                )
            )
        return results

    def reset_prefix_cache(self) -> None:
        """Drop every cached page (only when no request is running)."""
        if self.cache is not None:
            self.cache.reset()

    # -- requests -----------------------------------------------------------------------

    def _make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None,
        detokenize: bool,
    ) -> Request:
        params.validate()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("prompt: this checkpoint has no tokenizer; pass token ids")
            prompt_ids = list(self.tokenizer.encode(prompt))
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise RequestError("prompt: must contain at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(
                f"prompt: {len(prompt_ids)} tokens leave no room to generate within "
                f"max_seq_len {self.max_seq_len}"
            )
        if not self.config.enable_chunked_prefill and len(prompt_ids) > self.config.max_num_tokens:
            raise RequestError(
                f"prompt: {len(prompt_ids)} tokens exceed max_num_tokens "
                f"{self.config.max_num_tokens} and chunked prefill is disabled"
            )
        longest = min(len(prompt_ids) + params.max_tokens, self.max_seq_len)
        if -(-longest // self.page_size) > self.kv_pool.num_pages:
            raise RequestError(
                f"prompt + max_tokens: {longest} tokens need more KV pages than the pool has "
                f"({self.kv_pool.num_pages} pages of {self.page_size} tokens)"
            )
        if params.stop and (self.tokenizer is None or not detokenize):
            raise RequestError("stop: stop strings need a tokenizer and detokenization")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        generator = params.make_generator(self.device)
        req = Request(rid, prompt_ids, params, next(self._arrivals), generator=generator)
        if detokenize and self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, params.skip_special_tokens
            )
        return req

    def follow(self) -> None:
        """A lockstep follower's loop: step as the leader says until it says stop."""
        while not self.lockstep_stopped:
            self.step()

    def _take_inbox(self) -> list[tuple[str, Any]]:
        """This step's inbox: the callers' (shared with the followers by a lockstep leader),
        or on a follower, the leader's."""
        digest = (self._step, len(self._requests), self._totals["generation"])
        if isinstance(self.lockstep, StepFollower):
            inputs = self.lockstep.receive_inputs()
            if inputs.stop:
                self.lockstep_stopped = True
                return []
            check_digest(self.tp.rank, self._step, digest, inputs.digest)
            return [(kind, self._unmirror(kind, item)) for kind, item in inputs.inbox]
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        if isinstance(self.lockstep, StepLeader):
            shared = [(kind, self._mirror(kind, item)) for kind, item in inbox]
            self.lockstep.publish_inputs(StepInputs(digest, shared))
        return inbox

    @staticmethod
    def _mirror(kind: str, item: Any) -> Any:
        """An inbox item as the followers get it: requests rebuilt without what cannot
        travel, reservations without the leader's future."""
        if kind == "reserve":
            return item[:2]
        if kind != "add":
            return item  # an abort's request id
        req = item
        return MirroredRequest(
            req.request_id,
            list(req.prompt_ids),
            mirrored_params(req.params),
            req.arrival,
            req.detokenizer is not None,
            export_kv_from=req.export_kv_from,
            # Pickled to the followers: from host memory, so none of them unpickles it onto
            # the leader's GPU.
            kv=None
            if req.kv_import is None
            else replace(req.kv_import, data=req.kv_import.data.cpu()),
        )

    def _unmirror(self, kind: str, item: Any) -> Any:
        if kind == "reserve":
            return (*item, None)  # the follower's reservation reports to nobody
        return self._rebuild(item) if kind == "add" else item

    def _rebuild(self, item: MirroredRequest) -> Request:
        """A follower's copy of a leader's request (it never samples: no generator)."""
        req = Request(item.request_id, item.prompt_ids, item.params, item.arrival)
        if item.detokenize and self.tokenizer is not None:
            req.detokenizer = IncrementalDetokenizer(
                self.tokenizer, item.prompt_ids, item.params.skip_special_tokens
            )
        req.export_kv_from = item.export_kv_from
        if item.kv is not None:
            self._accept_handoff(req, item.kv)  # the leader accepted it: so does this rank
        return req

    def _drain_inbox(self) -> list[RequestOutput]:
        inbox = self._take_inbox()
        outputs = []
        for kind, item in inbox:
            if kind == "add":
                # Pages reserved ahead of a transfer serve it whether or not the K/V came.
                item.reservation = self._reservations.pop(item.request_id, None)
                self._requests[item.request_id] = item
                self.scheduler.add(item)
                self._totals["prompt"] += item.num_prompt_tokens
            elif kind == "reserve":
                rid, prompt_ids, reply = item
                try:
                    reserved = self.reserve_kv(rid, prompt_ids)
                except RequestError as exc:
                    if reply is None:
                        raise  # a follower: the leader's reservation succeeded
                    if reply.set_running_or_notify_cancel():
                        reply.set_exception(exc)
                else:
                    if reply is not None and reply.set_running_or_notify_cancel():
                        reply.set_result(reserved)
            else:
                reservation = self._reservations.pop(item, None)
                if reservation is not None:
                    self.scheduler.cancel_reservation(reservation)
                req = self._requests.get(item)
                if req is not None and not req.finished:
                    req.finish_reason = "abort"
                    self._finish(req)
                    outputs.append(self._output(req, 0, ""))
        return outputs

    def _finish(self, req: Request) -> None:
        if req.export_kv_from is not None and req.finish_reason != "abort":
            # Copied out before the pages go back to the pool (and the prefix cache).
            req.kv_export = self._export_kv(req)
        self.scheduler.finish(req)
        del self._requests[req.request_id]
        if req.request_id in self._collect:
            self._collect[req.request_id] = req
        self._totals["finished"] += 1

    def _sampling_row(self, req: Request) -> SamplingRow:
        params = req.params
        banned: tuple[int, ...] = ()
        if req.num_output_tokens < params.min_tokens:
            eos = () if params.ignore_eos else tuple(self.eos_token_ids)
            banned = eos + tuple(params.stop_token_ids)
        # Copying the output ids costs O(length) per step: only penalties and processors read them.
        needs_history = (
            params.logits_processors
            or params.repetition_penalty != 1.0
            or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0
        )
        return SamplingRow(
            params=params,
            prompt_ids=req.prompt_ids,
            output_ids=req.output_ids if needs_history else (),
            generator=req.generator,
            banned_token_ids=banned,
        )

    def _append_token(
        self,
        req: Request,
        token: int,
        logprob: float | None,
        top: list[tuple[int, float]] | None,
    ) -> RequestOutput:
        params = req.params
        req.token_ids.append(token)
        self._totals["generation"] += 1
        if params.logprobs is not None:
            req.logprobs.append(logprob)
            req.top_logprobs.append(top)
        if req.detokenizer is not None:
            req.text += req.detokenizer.add(token)

        if not params.ignore_eos and token in self.eos_token_ids:
            req.finish_reason = "stop"
        elif token in params.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif params.stop and self._truncate_at_stop_string(req):
            req.finish_reason = "stop"
        elif req.num_output_tokens >= params.max_tokens or req.seq_len >= self.max_seq_len:
            req.finish_reason = "length"

        if req.finish_reason is not None:
            self._finish(req)
            visible = len(req.text)
        else:
            # Hold back text that may turn out to be the start of a stop string.
            visible = len(req.text) - (max(map(len, params.stop), default=1) - 1)
        new_text = req.text[req.num_emitted_chars : max(visible, req.num_emitted_chars)]
        new_tokens = len(req.token_ids) - len(req.prompt_ids) - req.num_emitted_tokens
        return self._output(req, new_tokens, new_text)

    def _truncate_at_stop_string(self, req: Request) -> bool:
        stops = req.params.stop
        # Only the tail can hold a new match: the last token plus the longest stop string.
        search_from = max(0, req.num_emitted_chars - max(map(len, stops)))
        hits = [(req.text.find(s, search_from), s) for s in stops]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        req.text = req.text[:pos]
        req.stop_reason = stop
        return True

    def _output(self, req: Request, new_tokens: int, new_text: str) -> RequestOutput:
        n_out = req.num_output_tokens
        first = n_out - new_tokens
        out = RequestOutput(
            request_id=req.request_id,
            new_token_ids=req.output_ids[first:] if new_tokens else [],
            new_text=new_text,
            finished=req.finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=n_out,
            num_cached_tokens=req.num_cached_tokens,
            new_logprobs=req.logprobs[first:] if req.params.logprobs is not None else [],
            new_top_logprobs=req.top_logprobs[first:] if req.params.logprobs is not None else [],
            kv=req.kv_export,
        )
        req.num_emitted_tokens = n_out
        req.num_emitted_chars += len(new_text)
        return out

    # -- stats --------------------------------------------------------------------------

    def _snapshot(
        self,
        batch: ScheduledBatch,
        decode_tokens: int,
        seconds: float,
        schedule_seconds: float,
        forward_seconds: float,
    ) -> EngineStats:
        # The autoscaling signal: uncached prompt tokens still to prefill plus the whole
        # sequence of every decoding request. Queued requests count too (their prompt, less
        # what an earlier admission found cached): a saturated worker's queue is load the
        # autoscaler must see, or it would never scale past the batch it can run.
        in_flight = 0
        for req in self.scheduler.running:
            if req.is_decoding:
                in_flight += req.seq_len
            else:
                in_flight += req.seq_len - req.prefill_hit
        for req in self.scheduler.waiting:
            in_flight += req.seq_len - req.prefill_hit
        self._totals["cached"] += batch.cached_tokens
        cached_pages = self.cache.cached_pages if self.cache is not None else 0
        evictable = self.cache.evictable_pages if self.cache is not None else 0
        total = self.kv_pool.num_pages
        return EngineStats(
            step=self._step,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_pages_total=total,
            kv_pages_used=total - self.allocator.num_free,
            kv_pages_free=self.allocator.num_free,
            kv_pages_cached=cached_pages,
            kv_pages_evictable=evictable,
            page_size=self.page_size,
            prefill_tokens=batch.num_tokens - decode_tokens,
            decode_tokens=decode_tokens,
            in_flight_tokens=in_flight,
            cached_tokens=batch.cached_tokens,
            prompt_tokens_total=self._totals["prompt"],
            generation_tokens_total=self._totals["generation"],
            cached_tokens_total=self._totals["cached"],
            num_retractions_total=self.scheduler.num_retractions,
            num_finished_total=self._totals["finished"],
            spec_draft_tokens_total=self._spec["drafted"],
            spec_accepted_tokens_total=self._spec["accepted"],
            spec_verify_steps_total=self._spec["verified"],
            step_seconds=seconds,
            schedule_seconds=schedule_seconds,
            forward_seconds=forward_seconds,
            expert_imbalance=self.balancer.imbalance if self.balancer is not None else 1.0,
        )
