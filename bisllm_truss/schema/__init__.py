"""Pydantic models of a bisllm `config.yaml` (the BIS-LLM `trt_llm` v2 schema plus our extensions)."""

from bisllm_truss.schema.config import BisllmConfig

__all__ = ["BisllmConfig"]
