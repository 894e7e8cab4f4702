"""Rotary position embedding, half-split ("rotate_half", NeoX) layout.

Frequencies follow transformers' `modeling_rope_utils` for the rope types the supported
families use (default, linear, llama3, yarn), so fp32 logits match the reference bit for bit.
cos/sin are computed on demand for the positions of each step (a handful of tiny ops, once per
forward), which needs no cache sized by max_position_embeddings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(hf_config: dict[str, Any], default_theta: float = 10_000.0) -> dict[str, Any]:
    """The unified `rope_parameters` dict of a config.json (transformers 5), also accepting the
    legacy `rope_scaling` + top-level `rope_theta` form. `default_theta` is the family's default
    when the config names none (e.g. 1e6 for Mixtral)."""
    # transformers gives a legacy `rope_scaling` priority over `rope_parameters`.
    params = dict(hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", hf_config.get("rope_theta", default_theta))
    if "partial_rotary_factor" in hf_config:
        params.setdefault("partial_rotary_factor", hf_config["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        max_pos = hf_config.get("max_position_embeddings")
        # A top-level `original_max_position_embeddings` (Phi-3 style) wins, as in transformers.
        if "original_max_position_embeddings" in hf_config:
            params["original_max_position_embeddings"] = hf_config[
                "original_max_position_embeddings"
            ]
        else:
            params.setdefault("original_max_position_embeddings", max_pos)
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_type {params['rope_type']!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return params


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: float, dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, float(attention_factor)


def compute_inv_freq(
    params: dict[str, Any], head_dim: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim // 2] fp32, attention factor that scales cos and sin)."""
    base = params["rope_theta"]
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    rope_type = params["rope_type"]
    if rope_type == "yarn":
        return _yarn(base, dim, params, max_position_embeddings)
    inv_freq = _base_inv_freq(base, dim)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, params)
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) for one step; `apply_rotary` rotates q and k with them."""

    def __init__(self, head_dim: int, params: dict[str, Any], max_position_embeddings: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.params = params
        self.max_position_embeddings = max_position_embeddings
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.register_buffer("inv_freq", torch.empty(self.rotary_dim // 2), persistent=False)
        self.attention_factor = 1.0
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent buffer; the loader calls this after `to_empty`."""
        inv_freq, self.attention_factor = compute_inv_freq(
            self.params, self.head_dim, self.max_position_embeddings
        )
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, each [T, 1, rotary_dim] in `dtype` (broadcast over heads)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        # rotate_half(x) * sin == roll(x, half) * [-sin, sin]; folding the sign into sin here
        # makes the per-layer rotation two multiplies, one roll and one add.
        cos = torch.cat((cos, cos), -1).to(dtype)
        sin = torch.cat((-sin, sin), -1).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def interleaved_to_half_split(x: torch.Tensor) -> torch.Tensor:
    """Evens then odds of the last dim. Rotary pairs that are adjacent elements (Meta's and
    DeepSeek's layout) become the half-split pairs `apply_rotary` rotates; given the same
    permutation, queries and keys keep every dot product of the interleaved rotation."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] (first rotary_dim dims; the rest pass through)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + x.roll(rot // 2, dims=-1) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + x_rot.roll(rot // 2, dims=-1) * sin, x_pass), dim=-1)
