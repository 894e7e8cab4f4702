"""LLMEngine in bf16 vs transformers, on the CPU and, where one is present, on CUDA.

bf16 cannot be held to the fp32 suite's token-for-token bar: rounding differs between any two
implementations (kernel choice, batch shape, reduction order), and on these random models a
near-tie between two tokens, or between two experts in a router, goes either way now and then,
after which two correct stacks continue differently. So the checks compare distributions:

- prefill: the engine's top-20 logprobs sit within max(2 x transformers-bf16's error, 0.05) of
  the fp32 reference, and the greedy pick is fp32's (or tied with it within that error), on
  all prompts but at most two of eight (router near-ties flipped the other way);
- 64 greedy tokens (batch 1, a mixed batch of 8, chunked prefill, prefix-cache hits): the
  engine's own continuation is teacher-forced through transformers-bf16 on the same device,
  and at every step the engine's top-5 logprobs are compared with transformers' for the same
  tokens. The median error over all steps must stay within DECODE_NOISE_FACTOR times the
  error transformers-bf16 makes against itself (its incremental decode vs its own
  teacher-forced forward). Isolated flips pass; a decode path that is off everywhere (wrong
  positions, scale, cache contents or dtype) does not. Each step's pick must also be the
  engine's own best token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.request import RequestOutput
from bisllm_server.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
VARIANTS = [
    "qwen3_moe",
    "qwen3_moe_mixed",
    "mixtral",
    "llama",
    "glm4_moe",
    "deepseek_v3",
    "gpt_oss",
    "llama4",
]
# The decode checks teacher-force the engine's tokens through transformers-bf16. Its GPT-OSS
# runs only with eager attention on the CPU (no SDPA; flex attention refuses sinks on the CPU),
# which rounds the softmax probabilities to bf16: its logprobs stray ~0.03 from fp32 where the
# engine's SDPA softmax does not, so that reference cannot judge the engine's decode. GPT-OSS
# keeps the prefill check (against fp32, where it beats transformers-bf16: max row error
# 0.11 vs 0.37) and the fp32 token-for-token suite.
DECODE_VARIANTS = [v for v in VARIANTS if v != "gpt_oss"]
MAX_TOKENS = 64
TOP_N = 5
PREFILL_FLOOR = 0.05
# Decode logprobs may stray from transformers-bf16's teacher-forced ones by this many times
# transformers' own decode-vs-prefill noise (plus a floor). Measured on the CPU: 1.0-1.9x
# normally (single prompts up to 2.9x); an attention scale off by 5% gives 3.4-9x.
DECODE_NOISE_FACTOR = 2.5
DECODE_NOISE_FLOOR = 0.005


def _random_ids(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=gen).tolist()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(20240611)
    return [_random_ids(gen, n) for n in (3, 40, 17, 8, 32, 12, 35, 5)]


# A router near-tie inside the shared prefix would flip one way in the engine and the other in
# transformers, and, the prefix being cached once for all four requests, would shift every step
# of every one (seed 7 had a top-2 margin of 0.0002 in qwen3_moe_mixed and failed on CUDA).
# Under this seed (the only one in 0-119) the fp32 top-k margins of all five MoE variants stay
# >= 0.001 (benchmarks/router_margins.py prints them).
PREFIX_SEED = 42


def _prefix_prompts(seed: int = PREFIX_SEED) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    shared = _random_ids(gen, 24)
    return [shared + _random_ids(gen, 3 + i) for i in range(4)]


PROMPTS = _prompts()
PREFIX_PROMPTS = _prefix_prompts()


def engine_for(path: Path, device: str, **overrides: Any) -> LLMEngine:
    # A fixed small pool: on CUDA the default (a fraction of free memory) would be tens of GB.
    config = EngineConfig(
        model=path, dtype="bfloat16", device=device, num_kv_pages=512, **overrides
    )
    engine = LLMEngine(config)
    assert engine.model_config.dtype == torch.bfloat16
    return engine


@pytest.fixture(scope="module")
def hf_bf16(checkpoint: Callable[[str], Path]) -> Callable[[str, str], Any]:
    from transformers import AutoModelForCausalLM

    models: dict[tuple[str, str], Any] = {}

    def get(variant: str, device: str) -> Any:
        if (variant, device) not in models:
            model = AutoModelForCausalLM.from_pretrained(checkpoint(variant), dtype=torch.bfloat16)
            models[variant, device] = model.to(device).eval()
        return models[variant, device]

    return get


def teacher_forced_logprobs(
    model: Any, device: str, prompt: Sequence[int], tokens: list[int]
) -> torch.Tensor:
    """[len(tokens), vocab] fp32 logprobs of `model` for each generated position, in one
    forward over the prompt and all but the last token."""
    ids = torch.tensor([list(prompt) + tokens[:-1]], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 :]
    return logits.float().log_softmax(-1).cpu()


@pytest.fixture(scope="module")
def hf_decode_noise(hf_bf16: Callable[[str, str], Any]) -> Callable[[str, str], float]:
    """transformers-bf16's own decode-vs-prefill disagreement: the median, over the steps of
    its greedy `generate` on four prompts, of the largest |logprob difference| among the step's
    top-5 tokens between the incremental decode and one teacher-forced forward."""
    done: dict[tuple[str, str], float] = {}

    def get(variant: str, device: str) -> float:
        if (variant, device) not in done:
            model, errors = hf_bf16(variant, device), []
            for prompt in PROMPTS[:4]:
                ids = torch.tensor([prompt], device=device)
                with torch.no_grad():
                    out = model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,
                        max_new_tokens=MAX_TOKENS,
                        eos_token_id=None,
                        pad_token_id=2,
                        output_logits=True,
                        return_dict_in_generate=True,
                    )
                tokens = out.sequences[0, len(prompt) :].tolist()
                ref = teacher_forced_logprobs(model, device, prompt, tokens)
                for j, logits in enumerate(out.logits):
                    lp = logits[0].float().log_softmax(-1).cpu()
                    top = lp.topk(TOP_N).indices
                    errors.append((lp[top] - ref[j, top]).abs().max())
            done[variant, device] = float(torch.stack(errors).median())
        return done[variant, device]

    return get


def greedy_params() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_N)


def assert_close_to_references(
    variant: str,
    device: str,
    prompts: Sequence[Sequence[int]],
    results: Sequence[RequestOutput],
    hf_bf16: Callable[[str, str], Any],
    hf_decode_noise: Callable[[str, str], float],
) -> None:
    errors, per_prompt = [], []
    for prompt, result in zip(prompts, results, strict=True):
        first = len(errors)
        ours = result.token_ids
        assert len(ours) == len(result.top_logprobs) == MAX_TOKENS
        ref = teacher_forced_logprobs(hf_bf16(variant, device), device, prompt, ours)
        for j, top in enumerate(result.top_logprobs):
            assert top is not None and len(top) == TOP_N
            # Greedy picks its own best token (bf16 logits tie often; any of the tied will do).
            assert result.logprobs[j] == top[0][1], (j, ours[j], top)
            ids = torch.tensor([t for t, _ in top])
            errors.append((torch.tensor([lp for _, lp in top]) - ref[j, ids]).abs().max())
        per_prompt.append(torch.stack(errors[first:]))
    err = torch.stack(errors)
    noise = hf_decode_noise(variant, device)
    allowed = DECODE_NOISE_FACTOR * noise + DECODE_NOISE_FLOOR
    median = float(err.median())
    assert median <= allowed, (
        f"{variant} on {device}: median logprob error {median:.4f} over {len(err)} steps; "
        f"transformers-bf16's own decode noise is {noise:.4f} (allowed {allowed:.4f}); "
        # Whether the error is everywhere or starts at some step tells a systematic difference
        # (e.g. in the cached prefix) from a near-tie flip.
        f"per prompt: median {[round(float(e.median()), 4) for e in per_prompt]}, "
        f"first 4 steps {[[round(float(x), 3) for x in e[:4]] for e in per_prompt]}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_prefill_logprobs_close_to_fp32(variant, device, checkpoint, hf_model, hf_bf16):
    engine = engine_for(checkpoint(variant), device, max_batch_size=8)
    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=20))
    off = []
    for prompt, result in zip(PROMPTS, results, strict=True):
        with torch.no_grad():
            ref = hf_model(variant)(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
            theirs = hf_bf16(variant, device)(torch.tensor([prompt], device=device)).logits
        theirs_lp = theirs[0, -1].float().log_softmax(-1).cpu()
        top = result.top_logprobs[0]
        assert top is not None and len(top) == 20
        ids = torch.tensor([t for t, _ in top])
        ours_err = (torch.tensor([lp for _, lp in top]) - ref[ids]).abs().max().item()
        theirs_err = (theirs_lp[ids] - ref[ids]).abs().max().item()
        # fp32's pick, or a token tied with it within the engine's own error.
        (token,) = result.token_ids
        picked_ok = ref.max() - ref[token] <= 2 * ours_err
        if ours_err > max(2 * theirs_err, PREFILL_FLOOR) or not picked_ok:
            off.append((len(prompt), round(ours_err, 4), round(theirs_err, 4)))
    # Two prompts of eight may be off: a router near-tie inside one (a gap of ~1e-3 between the
    # k-th and next expert's score, see benchmarks/router_margins.py) can flip one way in the
    # engine's bf16 and the other in transformers', and moves that prompt's logprobs a lot
    # (deepseek_v3 has two such prompts, margins 0.0019 and 0.0006, confirmed as flips by
    # hooking the routers). A systematic error is off on most prompts: an attention scale 5%
    # off leaves 3 to 8 of 8 off in every variant.
    assert len(off) <= 2, f"(prompt length, our error, transformers-bf16's error): {off}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_bf16_greedy_batch1(variant, device, checkpoint, hf_bf16, hf_decode_noise):
    engine = engine_for(checkpoint(variant), device)
    prompts = PROMPTS[:4]
    results = [engine.generate([prompt], greedy_params())[0] for prompt in prompts]
    assert_close_to_references(variant, device, prompts, results, hf_bf16, hf_decode_noise)


@pytest.mark.parametrize(
    "engine_kwargs",
    [{"max_batch_size": 8}, {"max_batch_size": 8, "max_num_tokens": 5}],
    ids=["mixed_batch", "chunked_prefill"],
)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_bf16_greedy_batched(variant, device, engine_kwargs, checkpoint, hf_bf16, hf_decode_noise):
    engine = engine_for(checkpoint(variant), device, **engine_kwargs)
    results = engine.generate(PROMPTS, greedy_params())
    assert_close_to_references(variant, device, PROMPTS, results, hf_bf16, hf_decode_noise)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_bf16_greedy_prefix_cache_hits(variant, device, checkpoint, hf_bf16, hf_decode_noise):
    engine = engine_for(checkpoint(variant), device, page_size=4)
    (first,) = engine.generate(PREFIX_PROMPTS[:1], greedy_params())
    rest = engine.generate(PREFIX_PROMPTS[1:], greedy_params())
    assert [r.num_cached_tokens for r in rest] == [24] * len(rest)
    assert_close_to_references(
        variant, device, PREFIX_PROMPTS, [first, *rest], hf_bf16, hf_decode_noise
    )
