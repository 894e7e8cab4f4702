"""Facts about the accelerators Truss can request: names, CUDA compute capability, memory."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Accelerator(str, enum.Enum):
    """Truss's accelerator list (truss/base/truss_config.py), in Truss's spelling."""

    T4 = "T4"
    L4 = "L4"
    A10G = "A10G"
    V100 = "V100"
    A100 = "A100"
    A100_40GB = "A100_40GB"
    H100 = "H100"
    H200 = "H200"
    H100_40GB = "H100_40GB"
    B200 = "B200"
    L40S = "L40S"
    RTX_PRO_6000 = "RTX_PRO_6000"
    B300 = "B300"
    GB300 = "GB300"


@dataclass(frozen=True)
class GpuInfo:
    compute_capability: int  # major*10 + minor, e.g. 90 for sm_90
    memory_gib: int


GPU_INFO: dict[Accelerator, GpuInfo] = {
    Accelerator.T4: GpuInfo(75, 16),
    Accelerator.L4: GpuInfo(89, 24),
    Accelerator.A10G: GpuInfo(86, 24),
    Accelerator.V100: GpuInfo(70, 16),
    Accelerator.A100: GpuInfo(80, 80),
    Accelerator.A100_40GB: GpuInfo(80, 40),
    Accelerator.H100: GpuInfo(90, 80),
    Accelerator.H200: GpuInfo(90, 141),
    Accelerator.H100_40GB: GpuInfo(90, 40),
    Accelerator.B200: GpuInfo(100, 180),
    Accelerator.L40S: GpuInfo(89, 48),
    Accelerator.RTX_PRO_6000: GpuInfo(120, 96),
    Accelerator.B300: GpuInfo(103, 288),
    Accelerator.GB300: GpuInfo(103, 288),
}

FP8_MIN_COMPUTE = 89
FP4_MIN_COMPUTE = 100
