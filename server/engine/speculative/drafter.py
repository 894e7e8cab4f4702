"""Runs a hidden-state draft model (EAGLE, MTP) beside the target, step by step.

After every target forward, `extend` feeds the draft each position the target just computed,
paired with the token after it (known for prompt positions and freshly sampled or accepted
ones), so the draft's K/V always covers what the target's does. For each request now decoding,
the draft's output at its last such position gives the first draft token (kept on the request
with that hidden state, `Request.draft_hint`).

At the next step the engine appends the drafts as placeholders (the first one repeated) so the
scheduler reserves their pages, and `chain` then replaces the placeholders with the draft's
autoregressive continuation, each step one position further and fed its own hidden state.
Draft K/V written at rejected positions is overwritten by the next `extend` before anything
reads it: attention only ever reads positions at or before the query.
"""

from __future__ import annotations

import torch

from bisllm_server.engine.attention import AttentionBackend
from bisllm_server.engine.forward_batch import ForwardBatch
from bisllm_server.engine.model_runner import ModelRunner
from bisllm_server.engine.models.decoder import HiddenCapture
from bisllm_server.engine.request import Request
from bisllm_server.engine.speculative.draft_model import DraftModel


class ModelDrafter:
    def __init__(
        self,
        draft: DraftModel,
        attn: AttentionBackend,
        runner: ModelRunner,
        num_draft_tokens: int,
    ) -> None:
        self.draft = draft
        self.attn = attn  # over the draft's own KV pool
        self.runner = runner  # the target's: its page table addresses both pools
        self.num_draft_tokens = num_draft_tokens

    def capture(self) -> HiddenCapture:
        """What the target forward must hand over for `extend`."""
        return HiddenCapture(aux_layers=self.draft.aux_layers)

    def propose(self, req: Request, limit: int) -> list[int]:
        """Placeholders for up to `limit` drafts (the first is final; `chain` fills the rest)."""
        if req.draft_hint is None or limit <= 0:
            return []
        return [req.draft_hint[0]] * min(self.num_draft_tokens, limit)

    @torch.inference_mode()
    def extend(
        self, fb: ForwardBatch, items: list[tuple[Request, int, int]], capture: HiddenCapture
    ) -> None:
        """Run the draft over the target's step `fb`: `items` are its (request, first
        position, count) in batch order, read after the step's tokens were appended."""
        next_tokens: list[int] = []
        hint_rows: list[int] = []
        hinted: list[Request] = []
        offset = 0
        for req, begin, n in items:
            following = req.token_ids[begin + 1 : begin + n + 1]
            # Positions past the accepted tokens get filler: their draft K/V is rewritten
            # before it is read (see the module docstring).
            following += [req.token_ids[-1]] * (n - len(following))
            next_tokens.extend(following)
            last = req.seq_len - 2 - begin  # row of the last position whose next token is known
            if not req.finished and req.is_decoding and 0 <= last < n:
                hinted.append(req)
                hint_rows.append(offset + last)
            else:
                req.draft_hint = None
            offset += n
        input_ids = torch.tensor(next_tokens, dtype=torch.int64).to(fb.input_ids.device)
        self.attn.begin(fb)  # the same positions and slots as the target's step
        hidden = self.draft(input_ids, self.draft.target_features(capture), fb.positions, self.attn)
        if hinted:
            rows = hidden[torch.tensor(hint_rows, dtype=torch.int64, device=hidden.device)]
            tokens = self.draft.propose(rows).tolist()
            for req, token, row in zip(hinted, tokens, rows, strict=True):
                req.draft_hint = (token, row)

    @torch.inference_mode()
    def chain(self, reqs: list[Request]) -> None:
        """Replace drafts 2.. of each request (scheduled, so their pages exist) with the draft
        model's own continuation of its first draft."""
        active = [req for req in reqs if req.num_draft >= 2 and req.draft_hint is not None]
        if not active:
            return
        tokens = [req.draft_hint[0] for req in active]  # type: ignore[index]
        hidden = torch.stack([req.draft_hint[1] for req in active])  # type: ignore[index]
        for req in active:
            self.runner.sync_pages(req)
        step = 1
        while active:
            # Draft j + 1 comes from position S - 2 + j, which holds draft j (S: real length).
            kv_lens = [req.seq_len - req.num_draft - 1 + step for req in active]
            fb = self.runner.make_batch(
                tokens,
                [1] * len(active),
                kv_lens,
                [req.row for req in active],
                list(range(len(active))),
            )
            self.attn.begin(fb)
            hidden = self.draft(fb.input_ids, hidden, fb.positions, self.attn)
            tokens = self.draft.propose(hidden).tolist()
            keep = []
            for i, req in enumerate(active):
                req.token_ids[req.seq_len - req.num_draft + step] = tokens[i]
                if req.num_draft > step + 1:
                    keep.append(i)
            active = [active[i] for i in keep]
            tokens = [tokens[i] for i in keep]
            hidden = hidden[keep]
            step += 1
