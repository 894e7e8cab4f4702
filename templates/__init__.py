"""Jinja2 templates rendered by `bisllm package` (truss dir, Docker context, Kubernetes)."""

from pathlib import Path

TEMPLATE_ROOT = Path(__file__).resolve().parent
