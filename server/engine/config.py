"""Engine settings: what the scheduler, KV pool and model runner are sized from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SchedulePolicy = Literal["fcfs", "lpm"]
SCHEDULE_POLICIES: tuple[str, ...] = ("fcfs", "lpm")
SpeculativeMethod = Literal["ngram", "eagle", "mtp"]
SPECULATIVE_METHODS: tuple[str, ...] = ("ngram", "eagle", "mtp")


class EngineConfigError(ValueError):
    """A setting is out of range; the message names the field and what was expected."""


@dataclass
class EngineConfig:
    model: str | Path
    dtype: str = "auto"
    device: str = "cpu"
    # Most requests running at once (SGLang max_running_requests / vLLM max_num_seqs).
    max_batch_size: int = 64
    # Token budget of one forward: prefill chunks plus one token per decoding request.
    max_num_tokens: int = 2048
    # Longest sequence (prompt + output); None takes the checkpoint's max_position_embeddings.
    max_seq_len: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    schedule_policy: SchedulePolicy = "fcfs"
    page_size: int = 16
    # KV budget: bytes on CPU; fraction of free memory on GPU. num_kv_pages overrides both.
    kv_cache_bytes: int = 256 * 1024 * 1024
    gpu_memory_fraction: float = 0.85
    num_kv_pages: int | None = None
    seed: int | None = None
    # On CPU, run decode attention and small-batch experts in the compiled C++ kernels
    # (built on first use; the PyTorch paths stay when the build is impossible).
    cpu_kernels: bool = True
    # Speculative decoding: up to `num_draft_tokens` draft tokens per step, verified in the
    # same forward. "ngram" looks them up in the request's own tokens (suffixes
    # `ngram_min`..`ngram_max` tokens long); "eagle" runs the EAGLE / EAGLE-3 head in
    # `speculative_model`; "mtp" runs the checkpoint's own NextN layer. None: off.
    speculative_method: SpeculativeMethod | None = None
    num_draft_tokens: int = 4
    speculative_model: str | Path | None = None
    # Expert-parallel load balancing (an engine given a TP group with ep_size > 1): redundant
    # expert slots per MoE layer (SGLang's --ep-num-redundant-experts), and forward passes
    # between rebalances (--eplb-rebalance-num-iterations; 0: never rebalance).
    ep_num_redundant_experts: int = 0
    eplb_rebalance_interval: int = 0
    ngram_min: int = 1
    ngram_max: int = 4

    def validate(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_num_tokens": self.max_num_tokens,
            "page_size": self.page_size,
            "kv_cache_bytes": self.kv_cache_bytes,
        }
        if self.max_seq_len is not None:
            positive["max_seq_len"] = self.max_seq_len
        if self.num_kv_pages is not None:
            positive["num_kv_pages"] = self.num_kv_pages
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("ep_num_redundant_experts", "eplb_rebalance_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise EngineConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise EngineConfigError(
                f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}"
            )
        if self.speculative_method is not None:
            if self.speculative_method not in SPECULATIVE_METHODS:
                raise EngineConfigError(
                    f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)} or "
                    f"None, got {self.speculative_method!r}"
                )
            for name in ("num_draft_tokens", "ngram_min", "ngram_max"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise EngineConfigError(f"{name} must be a positive integer, got {value!r}")
            if self.speculative_method == "eagle" and not self.speculative_model:
                raise EngineConfigError(
                    "speculative_model: speculative_method 'eagle' needs the directory of an "
                    "EAGLE head (config.json + safetensors)"
                )
            if self.ngram_min > self.ngram_max:
                raise EngineConfigError(
                    f"ngram_min ({self.ngram_min}) must be <= ngram_max ({self.ngram_max})"
                )
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise EngineConfigError(
                f"schedule_policy must be one of {', '.join(SCHEDULE_POLICIES)}, "
                f"got {self.schedule_policy!r}"
            )
