"""Per-request sampling parameters and the batched sampler that turns logits into token ids.

Processing order per row: banned ids -> logits processors -> repetition penalty ->
presence/frequency penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw.
Reported logprobs come from the raw model logits (vLLM's default "raw logprobs").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger("bisllm.engine")

# (output token ids so far, this row's logits [V]) -> new logits [V]; grammar masks plug in here.
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]

MAX_LOGPROBS = 20
GREEDY_TEMPERATURE = 1e-5  # below this, dividing by the temperature only amplifies rounding noise
# Top-p first looks at this many most-likely tokens; nucleus sets are usually far smaller, and a
# full sort of a 150k vocab costs ~10x more on CPU. Rows whose mass is not reached widen the search.
_TOP_P_FIRST_K = 256
_CDF_BLOCK = 1024  # inverse-CDF block width; see _inverse_cdf


class NoAllowedTokenError(ValueError):
    """Banned ids or logits processors masked every token of some rows (listed in `rows`)."""

    def __init__(self, rows: list[int]) -> None:
        super().__init__(f"batch rows {rows} have no allowed token (all logits -inf)")
        self.rows = rows


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names the field, value and expectation."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_penalty(value: object) -> bool:
    return _is_real(value) and -2 <= value <= 2  # type: ignore[operator]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: chosen token only; n: chosen + top-n
    skip_special_tokens: bool = True  # in the detokenized text
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    def __post_init__(self) -> None:
        # OpenAI accepts `stop` as one string or a list; keep one shape downstream.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logits_processors = list(self.logits_processors or [])

    @classmethod
    def create(cls, **kwargs: object) -> SamplingParams:
        """Build from request fields where None means "not given", then validate."""
        params = cls(**{k: v for k, v in kwargs.items() if v is not None})  # type: ignore[arg-type]
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        """Raise SamplingParamsError for the first field out of range (OpenAI/vLLM ranges)."""
        ints_ok = _is_int(self.max_tokens) and _is_int(self.min_tokens)
        checks: list[tuple[bool, str, str]] = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0"),
            (
                ints_ok and self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"<= max_tokens ({self.max_tokens!r})",
            ),
            (_is_real(self.temperature) and self.temperature >= 0, "temperature", ">= 0"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (
                _is_int(self.top_k) and self.top_k >= -1,
                "top_k",
                "an integer >= -1 (0 or -1 disables it)",
            ),
            (_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (
                _is_real(self.repetition_penalty) and self.repetition_penalty > 0,
                "repetition_penalty",
                "> 0",
            ),
            (_is_penalty(self.presence_penalty), "presence_penalty", "in [-2, 2]"),
            (_is_penalty(self.frequency_penalty), "frequency_penalty", "in [-2, 2]"),
            (self.seed is None or _is_int(self.seed), "seed", "an integer or None"),
            (
                self.logprobs is None
                or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                "logprobs",
                f"None or an integer in [0, {MAX_LOGPROBS}]",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                "stop",
                "a list of non-empty strings",
            ),
            (
                all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids",
                "a list of integers >= 0",
            ),
            (isinstance(self.ignore_eos, bool), "ignore_eos", "a boolean"),
            (isinstance(self.skip_special_tokens, bool), "skip_special_tokens", "a boolean"),
            (
                all(callable(p) for p in self.logits_processors),
                "logits_processors",
                "a list of callables",
            ),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise SamplingParamsError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The per-request generator the engine keeps for a seeded request (None if unseeded)."""
        if self.seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)  # OpenAI seeds are signed int64
        return gen


@dataclass
class SamplingRow:
    """What the sampler needs for one batch row."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None  # None: draw from the sampler's shared generator
    banned_token_ids: Sequence[int] = ()  # e.g. eos/stop ids until min_tokens is reached


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # chosen token's raw logprob; None where not requested
    top_logprobs: list[list[tuple[int, float]] | None]  # descending; [] for logprobs=0


def unedited(row: SamplingRow) -> bool:
    """Nothing edits the row's logits before the choice (no banned tokens, processors or
    penalties) and no logprobs are wanted: the next-token distribution after any position is a
    function of that position's logits alone, which is what verifying drafts needs."""
    p = row.params
    return (
        p.logprobs is None
        and not p.logits_processors
        and not row.banned_token_ids
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
    )


def plain_greedy(row: SamplingRow) -> bool:
    """Greedy on the raw logits: the token is their argmax, nothing edits them first."""
    return row.params.greedy and unedited(row)


# Row-subset helpers: `_take` gives the rows to edit in place (x itself when idx is None, else a
# copy) and `_put` writes a copy back. Skipping the gather when every row takes part saves two
# [B, V] copies per step.
def _take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x[idx]


def _put(x: torch.Tensor, idx: torch.Tensor | None, sub: torch.Tensor) -> None:
    if idx is None:
        if sub is not x:
            x.copy_(sub)
    else:
        x[idx] = sub


def _subset(selected: list[int], n: int, device: torch.device) -> torch.Tensor | None:
    """Row index tensor for `selected`, or None when it is every row (saves a gather/scatter)."""
    return None if len(selected) == n else torch.tensor(selected, device=device)


def _as_ids(*parts: Sequence[int]) -> torch.Tensor:
    """One CPU int64 tensor of token ids (free for tensors; lists cost one conversion)."""
    tensors = [torch.as_tensor(p, dtype=torch.long).reshape(-1).cpu() for p in parts if len(p)]
    if not tensors:
        return torch.empty(0, dtype=torch.long)
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _flat_positions(
    row_ids: list[tuple[int, torch.Tensor]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices row * V + token of every (non-empty) row's ids, padded to [b, L], and the
    mask of real entries. Padding repeats the row's first id, so an overwrite of values computed
    from a gather is idempotent on it."""
    width = max(len(ids) for _, ids in row_ids)
    pos = torch.empty(len(row_ids), width, dtype=torch.long)
    valid = torch.zeros(len(row_ids), width, dtype=torch.bool)
    for j, (row, ids) in enumerate(row_ids):
        pos[j, : len(ids)] = ids + row * vocab
        pos[j, len(ids) :] = int(ids[0]) + row * vocab
        valid[j, : len(ids)] = True
    return pos.to(device), valid.to(device)


def apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition, presence and frequency penalties, in place on contiguous float logits [B, V].

    Work is proportional to the number of ids touched, never to B * V: values are gathered at
    the seen ids, changed and written back through a flat view."""
    vocab = x.shape[1]
    flat = x.view(-1)
    rep = [
        (i, ids)
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0 and len(ids := _as_ids(r.prompt_ids, r.output_ids))
    ]
    if rep:
        pos, _ = _flat_positions(rep, vocab, x.device)
        pen = torch.tensor([rows[i].params.repetition_penalty for i, _ in rep], device=x.device)
        vals = flat[pos]
        # HF/vLLM convention: seen tokens become less likely whatever the logit's sign. Repeated
        # ids write the same value, so each seen token is penalized exactly once.
        flat[pos] = torch.where(vals > 0, vals / pen[:, None], vals * pen[:, None])
    add = [
        (i, ids)
        for i, r in enumerate(rows)
        if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0)
        and len(ids := _as_ids(r.output_ids))
    ]
    if add:
        pos, valid = _flat_positions(add, vocab, x.device)
        presence = torch.tensor([rows[i].params.presence_penalty for i, _ in add], device=x.device)
        frequency = torch.tensor(
            [rows[i].params.frequency_penalty for i, _ in add], device=x.device
        )
        if bool((presence != 0).any()):
            flat[pos] = flat[pos] - presence[:, None]  # once per distinct token, as above
        if bool((frequency != 0).any()):
            # scatter_add counts every occurrence: logit -= frequency * count
            step = torch.where(valid, -frequency[:, None], 0.0)
            flat.scatter_add_(0, pos.view(-1), step.view(-1))


def filter_probs_(
    probs: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> None:
    """Zero, in place, what top-k, then top-p, then min-p drop from each row of probs [B, V].

    Each filter comes down to a per-row cut-off probability, so all three share one topk call and
    one masking pass. Nothing is renormalized: inverse-CDF sampling scales by each row's total.
    Tokens tied with a cut-off value are kept.
    """
    n, vocab = probs.shape
    dev = probs.device
    ks = [k if 0 < k < vocab else 0 for k in top_k]
    chosen = [i for i in range(n) if ks[i] or top_p[i] < 1.0 or min_p[i] > 0.0]
    if not chosen:
        return
    idx = _subset(chosen, n, dev)
    sub = _take(probs, idx)
    k_row = torch.tensor([ks[i] for i in chosen], device=dev)
    cut = torch.zeros(len(chosen), dtype=probs.dtype, device=dev)
    use_p = [top_p[i] < 1.0 for i in chosen]
    if any(ks[i] for i in chosen) or any(use_p):
        width = max(ks[i] for i in chosen)
        if any(use_p):
            width = max(width, _TOP_P_FIRST_K)
        vals = sub.topk(min(vocab, width), dim=-1).values  # descending
        kth = vals.gather(1, (k_row - 1).clamp(min=0)[:, None]).squeeze(1)
        cut = torch.where(k_row > 0, kth, cut)
        if any(use_p):
            p_row = torch.tensor([top_p[i] for i in chosen], dtype=probs.dtype, device=dev)
            cut = torch.maximum(cut, _top_p_cut(sub, vals, k_row, p_row))
    if any(min_p[i] > 0.0 for i in chosen):
        # The most likely token survives top-k/top-p, so this is the unfiltered max.
        floor = torch.tensor([min_p[i] for i in chosen], dtype=probs.dtype, device=dev)
        cut = torch.maximum(cut, floor * sub.amax(dim=-1))
    _put(probs, idx, sub.masked_fill_(sub < cut[:, None], 0.0))


def _top_p_cut(
    sub: torch.Tensor, vals: torch.Tensor, k_row: torch.Tensor, p_row: torch.Tensor
) -> torch.Tensor:
    """Per-row probability of the last token of the nucleus: the smallest prefix of the
    (top-k-limited) sorted distribution whose mass reaches top_p. `vals` holds each row's largest
    probabilities, descending, and covers every top-k; rows whose nucleus runs past it widen the
    search. Rows with top_p == 1 get 0 (no cut)."""
    vocab = sub.shape[1]
    width = vals.shape[1]
    cols = torch.arange(width, device=sub.device)
    kept = vals.masked_fill((k_row[:, None] > 0) & (cols >= k_row[:, None]), 0.0)
    cum = kept.cumsum(dim=-1)
    # Mass is measured on what top-k left (the renormalized distribution), else on the whole row.
    target = p_row * torch.where(k_row > 0, cum[:, -1], sub.sum(dim=-1))
    first = (cum < target[:, None]).sum(dim=-1).clamp_(max=width - 1)
    cut = torch.where(p_row < 1.0, kept.gather(1, first[:, None]).squeeze(1), 0.0)
    # Top-k rows always close inside `vals`; others may need more of the row.
    pending = ((p_row < 1.0) & (cum[:, -1] < target)).nonzero().squeeze(1)
    while pending.numel() and width < vocab:
        width = min(vocab, width * 8)
        vals = sub[pending].topk(width, dim=-1).values
        cum = vals.cumsum(dim=-1)
        target_p = target[pending]
        first = (cum < target_p[:, None]).sum(dim=-1).clamp_(max=width - 1)
        cut[pending] = vals.gather(1, first[:, None]).squeeze(1)
        pending = pending[cum[:, -1] < target_p]
    return cut


def _last_positive(w: torch.Tensor) -> torch.Tensor:
    """Column of the last positive entry of each row."""
    cols = torch.arange(w.shape[1], device=w.device)
    return torch.where(w > 0, cols, -1).amax(dim=-1)


def _search(w: torch.Tensor, cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First column whose cumulative weight exceeds target. right=True never lands on a
    zero-weight column; only rounding can push target past the total, then take the last
    positive column."""
    found = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return torch.minimum(found, _last_positive(w))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column i of each row with probability weights[i] / sum(weights), from one uniform u in
    [0, 1) per row. Two levels: float32 block sums pick a block, then a float64 cumsum inside it
    picks the token. A single 150k-long float32 cumsum drifts by ~1e-5 of the mass, and a
    float64 one over the whole vocab costs ~4x more on CPU."""
    rows, vocab = weights.shape
    full = vocab // _CDF_BLOCK
    parts = [weights[:, : full * _CDF_BLOCK].reshape(rows, full, _CDF_BLOCK).sum(dim=-1)]
    if vocab % _CDF_BLOCK:
        parts.append(weights[:, full * _CDF_BLOCK :].sum(dim=-1, keepdim=True))
    block_w = torch.cat(parts, dim=1).to(torch.float64)
    block_cdf = block_w.cumsum(dim=-1)
    target = u * block_cdf[:, -1]
    block = _search(block_w, block_cdf, target)
    before = (block_cdf - block_w).gather(1, block[:, None]).squeeze(1)
    rest = (target - before).clamp_(min=0)  # rounding may dip below the block's start

    cols = block[:, None] * _CDF_BLOCK + torch.arange(_CDF_BLOCK, device=weights.device)
    inside = cols < vocab
    w = weights.gather(1, cols.clamp(max=vocab - 1)).to(torch.float64) * inside
    return block * _CDF_BLOCK + _search(w, w.cumsum(dim=-1), rest)


class Sampler:
    """Batched sampler. Seeded rows draw only from their own generator, exactly one uniform per
    sampled token (inverse-CDF sampling), so a seeded request reproduces whatever it is batched
    with. Unseeded rows share one generator, seeded from `seed` when given."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)
            self._shared[device] = gen
        return gen

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}"
            )
        n = len(rows)
        if all(plain_greedy(r) for r in rows):
            return SampleOutput(logits.argmax(dim=-1).tolist(), [None] * n, [None] * n)

        x = logits.to(torch.float32, copy=True)  # keep the raw logits intact for logprobs
        self._apply_banned(x, rows)
        for i, row in enumerate(rows):
            for proc in row.params.logits_processors:
                try:
                    x[i] = proc(row.output_ids, x[i])
                except Exception:
                    # A processor that fails (e.g. a grammar rejecting the history) ends only
                    # its own request, reported below like a row with no allowed token; the
                    # batch and the engine go on.
                    log.exception("logits processor failed; ending that request")
                    x[i] = -math.inf
                    break
        if any(r.banned_token_ids or r.params.logits_processors for r in rows):
            # Nothing left to sample (e.g. a grammar in a dead state) is a caller bug; failing
            # loudly beats emitting an arbitrary token.
            dead = (x.amax(dim=-1) == -math.inf).nonzero().flatten().tolist()
            if dead:
                raise NoAllowedTokenError(dead)
        apply_penalties(x, rows)
        tokens = self._choose(x, rows)
        logprobs, top = self._logprobs(logits, tokens, rows)
        return SampleOutput(tokens.tolist(), logprobs, top)

    @staticmethod
    def _apply_banned(x: torch.Tensor, rows: list[SamplingRow]) -> None:
        row_idx: list[int] = []
        tok_idx: list[int] = []
        for i, row in enumerate(rows):
            row_idx.extend([i] * len(row.banned_token_ids))
            tok_idx.extend(row.banned_token_ids)
        if tok_idx:
            x[
                torch.tensor(row_idx, device=x.device), torch.tensor(tok_idx, device=x.device)
            ] = -math.inf

    def _choose(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        n = x.shape[0]
        dev = x.device
        tokens = torch.empty(n, dtype=torch.long, device=dev)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            gidx = _subset(greedy, n, dev)
            _put(tokens, gidx, _take(x, gidx).argmax(dim=-1))
        if not sampled:
            return tokens

        sidx = _subset(sampled, n, dev)
        sub = _take(x, sidx)  # x is the sampler's own copy, so in-place edits are safe
        params = [rows[i].params for i in sampled]
        temps = [p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            sub.div_(torch.tensor(temps, device=dev)[:, None])
        # softmax rather than exp: torch's exp leaves its vector path on denormal results (~10x)
        probs = sub.softmax(dim=-1)
        top_k, top_p, min_p = ([getattr(p, f) for p in params] for f in ("top_k", "top_p", "min_p"))
        filter_probs_(probs, top_k, top_p, min_p)
        picked = _inverse_cdf(probs, self._uniforms([rows[i].generator for i in sampled], dev))
        _put(tokens, sidx, picked)
        return tokens

    def verify_drafts(self, logits: torch.Tensor, drafts: list[int], row: SamplingRow) -> list[int]:
        """The tokens a step yields for a request that drafted `drafts`: `logits` [k + 1, V]
        holds the target's logits after its last real token and after each draft.

        Greedy: drafts are accepted while they equal the argmax, then the argmax after the last
        accepted one follows, so the output is exactly what one-token decoding gives.

        Sampling (speculative sampling with a deterministic draft, Leviathan et al. / Chen et
        al.): draft d after position i is accepted with probability p_i(d), p_i the target's
        distribution after temperature, top-k, top-p and min-p. On the first rejection the
        token is drawn from p_i with d removed (the residual max(p_i - q, 0) for a one-hot q),
        and the step ends; when every draft is accepted a last token is drawn from p_k. Each
        emitted token is therefore distributed exactly as the target's. The row must be
        `unedited`."""
        if row.params.greedy:
            predicted = logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == predicted[accepted]:
                accepted += 1
            return predicted[: accepted + 1]
        p = row.params
        x = logits.to(torch.float32, copy=True)
        if p.temperature != 1.0:
            x.div_(p.temperature)
        probs = x.softmax(dim=-1)
        n = probs.shape[0]
        filter_probs_(probs, [p.top_k] * n, [p.top_p] * n, [p.min_p] * n)
        probs.div_(probs.sum(dim=-1, keepdim=True))
        gen = row.generator or self._shared_generator(logits.device)
        tokens: list[int] = []
        for i, draft in enumerate(drafts):
            u = torch.rand(1, generator=gen, dtype=torch.float64, device=gen.device).item()
            if u < probs[i, draft].item():
                tokens.append(draft)
                continue
            residual = probs[i].clone()
            residual[draft] = 0.0
            tokens.append(self._draw(residual, gen))
            return tokens
        tokens.append(self._draw(probs[len(drafts)], gen))
        return tokens

    @staticmethod
    def _draw(weights: torch.Tensor, gen: torch.Generator) -> int:
        u = torch.rand(1, generator=gen, dtype=torch.float64, device=gen.device)
        return int(_inverse_cdf(weights[None], u.to(weights.device))[0])

    def _uniforms(self, gens: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
        u = torch.empty(len(gens), dtype=torch.float64, device=device)
        shared = [i for i, g in enumerate(gens) if g is None]
        if shared:
            gen = self._shared_generator(device)
            draws = torch.rand(len(shared), generator=gen, dtype=torch.float64, device=device)
            u[torch.tensor(shared, device=device)] = draws
        for i, g in enumerate(gens):
            if g is not None:
                # Draw on the generator's own device so the engine may keep CPU generators.
                u[i] = torch.rand(1, generator=g, dtype=torch.float64, device=g.device)[0]
        return u

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, tokens: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        n = len(rows)
        chosen_lp: list[float | None] = [None] * n
        top: list[list[tuple[int, float]] | None] = [None] * n
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return chosen_lp, top
        idx = _subset(wanted, n, logits.device)
        lp = _take(logits, idx).to(torch.float32).log_softmax(dim=-1)
        picked = lp.gather(1, _take(tokens, idx)[:, None]).squeeze(1).tolist()
        counts = [rows[i].params.logprobs or 0 for i in wanted]
        top_vals: list[list[float]] = [[] for _ in wanted]
        top_ids: list[list[int]] = [[] for _ in wanted]
        if max(counts) > 0:
            best = lp.topk(max(counts), dim=-1)
            top_vals, top_ids = best.values.tolist(), best.indices.tolist()
        for j, i in enumerate(wanted):
            chosen_lp[i] = picked[j]
            top[i] = list(zip(top_ids[j][: counts[j]], top_vals[j][: counts[j]], strict=True))
        return chosen_lp, top
