"""Model registry: HF `architectures` / `model_type` names -> engine model classes."""

from __future__ import annotations

from typing import Any

from bisllm_server.engine.models.config import DecoderConfig, UnsupportedModelError
from bisllm_server.engine.models.decoder import DecoderForCausalLM
from bisllm_server.engine.models.deepseek_v3 import DeepseekV3ForCausalLM
from bisllm_server.engine.models.glm4_moe import Glm4MoeForCausalLM
from bisllm_server.engine.models.gpt_oss import GptOssForCausalLM
from bisllm_server.engine.models.llama import LlamaForCausalLM
from bisllm_server.engine.models.llama4 import Llama4ForCausalLM
from bisllm_server.engine.models.mixtral import MixtralForCausalLM
from bisllm_server.engine.models.qwen3_moe import Qwen3MoeForCausalLM
from bisllm_server.engine.models.weights import CheckpointMismatchError

ARCHITECTURES: dict[str, type[DecoderForCausalLM]] = {
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Glm4MoeForCausalLM": Glm4MoeForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "Llama4ForCausalLM": Llama4ForCausalLM,
    # The released Llama 4 repos are multimodal; the engine serves their text model.
    "Llama4ForConditionalGeneration": Llama4ForCausalLM,
}
MODEL_TYPES: dict[str, type[DecoderForCausalLM]] = {
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
    "llama": LlamaForCausalLM,
    "glm4_moe": Glm4MoeForCausalLM,
    "deepseek_v3": DeepseekV3ForCausalLM,
    "kimi_k2": DeepseekV3ForCausalLM,  # Kimi-K2's hub config: DeepSeek-V3's architecture
    "gpt_oss": GptOssForCausalLM,
    "llama4_text": Llama4ForCausalLM,
    "llama4": Llama4ForCausalLM,
}


def resolve_architecture(hf_config: dict[str, Any]) -> tuple[str, type[DecoderForCausalLM]]:
    """(architecture name, model class): the first supported entry of `architectures`, else
    the class registered for `model_type`; raises UnsupportedModelError otherwise."""
    architectures = hf_config.get("architectures") or []
    for name in architectures:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    model_type = hf_config.get("model_type")
    if model_type in MODEL_TYPES:
        cls = MODEL_TYPES[model_type]
        return cls.__name__, cls
    named = ", ".join(architectures) or "(none listed)"
    raise UnsupportedModelError(
        f"unsupported architecture {named} (model_type {model_type!r}); supported architectures: {', '.join(ARCHITECTURES)}"
    )


__all__ = [
    "ARCHITECTURES",
    "MODEL_TYPES",
    "CheckpointMismatchError",
    "DecoderConfig",
    "DecoderForCausalLM",
    "DeepseekV3ForCausalLM",
    "GptOssForCausalLM",
    "Llama4ForCausalLM",
    "LlamaForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "UnsupportedModelError",
    "resolve_architecture",
]
