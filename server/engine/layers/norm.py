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
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
