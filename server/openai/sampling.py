"""Request fields -> engine SamplingParams, and the per-request logits processors the
OpenAI surface adds (logit_bias)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bisllm_server.engine.sampling import LogitsProcessor, SamplingParams, SamplingParamsError
from bisllm_server.openai.errors import APIError, bad_request


class LogitBias:
    """Adds OpenAI's `logit_bias` ({token id: bias in [-100, 100]}) to the logits."""

    def __init__(self, bias: dict[str, float], vocab_size: int) -> None:
        ids = [int(key) for key in bias]
        outside = [t for t in ids if not 0 <= t < vocab_size]
        if outside:
            raise bad_request(
                f"logit_bias names token id {outside[0]}, outside the vocabulary [0, {vocab_size})",
                param="logit_bias",
            )
        self.ids = torch.tensor(ids, dtype=torch.int64)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        logits[self.ids] += self.values
        return logits


def context_length_error(
    max_seq_len: int, prompt_tokens: int, max_tokens: int | None, param: str
) -> APIError:
    """OpenAI's wording, with the numbers."""
    requested = prompt_tokens + (max_tokens or 0)
    where = "messages" if param == "messages" else "prompt"
    return APIError(
        400,
        f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
        f"{requested} tokens ({prompt_tokens} in the {where}, {max_tokens or 0} in the "
        f"completion). Please reduce the length of the {where} or completion.",
        param=param,
        code="context_length_exceeded",
    )


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, max_seq_len: int, param: str
) -> int:
    """The output budget: as requested when it fits, else a 400; by default what the
    context leaves after the prompt (vLLM's and SGLang's default)."""
    room = max_seq_len - prompt_tokens
    if room < 1 or (requested is not None and requested > room):
        raise context_length_error(max_seq_len, prompt_tokens, requested, param)
    return requested if requested is not None else room


def build_params(
    fields: Any,
    *,
    max_tokens: int,
    logprobs: int | None,
    seed: int | None,
    processors: list[LogitsProcessor],
    skip_special_tokens: bool,
) -> SamplingParams:
    """SamplingParams from the fields chat and completion requests share."""
    try:
        return SamplingParams.create(
            max_tokens=max_tokens,
            min_tokens=fields.min_tokens,
            temperature=fields.temperature,
            top_p=fields.top_p,
            top_k=fields.top_k,
            min_p=fields.min_p,
            repetition_penalty=fields.repetition_penalty,
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            seed=seed,
            stop=fields.stop,
            stop_token_ids=fields.stop_token_ids,
            ignore_eos=fields.ignore_eos,
            logprobs=logprobs,
            logits_processors=processors,
            skip_special_tokens=skip_special_tokens,
        )
    except SamplingParamsError as exc:
        field = str(exc).split(" ", 1)[0]
        raise bad_request(str(exc), param=field) from None
