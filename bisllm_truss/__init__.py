"""bisllm-truss: BIS-LLM-compatible config, packaging and CLI."""

__version__ = "0.1.0"
