"""RMSNorm with the same rounding as transformers: normalise in fp32, cast back, then scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim of x and scale by weight (broadcast against x)."""
    shape = (x.shape[-1],)
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.shape == shape:
        return F.rms_norm(x, shape, weight, eps)  # one fused kernel
    # The weight multiplies the value already rounded to the input dtype (transformers does
    # the same); scaling in fp32 first would drift from the reference in bf16.
    return weight * F.rms_norm(x.float(), shape, eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, fp32_scale: bool = False) -> None:
        """`fp32_scale`: keep the weight in fp32 and scale the fp32 normalised value by it,
        rounding once (GPT-OSS's norms, which transformers keeps in fp32)."""
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fp32_scale = fp32_scale
        if fp32_scale:
            self.fp32_parameters = ("weight",)  # read by the loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_scale and x.dtype != torch.float32:
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return (self.weight.float() * normed).to(x.dtype)
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
