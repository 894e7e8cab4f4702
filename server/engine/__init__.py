"""The bisllm engine: an SGLang-style runtime for MoE and dense decoder LLMs.

Paged KV cache, page-granular radix prefix cache, continuous batching with chunked prefill,
and sampling. Router, autoscaler, server and metrics read its state through `EngineStats`,
KV events and the engine API, never through the internals.
"""
