"""`resources`: what one replica of the deployment asks the cluster for."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from bisllm_truss.hardware import Accelerator
from bisllm_truss.issues import check_all
from bisllm_truss.schema.base import StrictModel

_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?([kMGTPE]i?)?$")
ACCELERATOR_NAMES = [a.value for a in Accelerator]


class AcceleratorSpec(StrictModel):
    """`TYPE[:COUNT]`, e.g. `B200:4`; a bare type means one GPU."""

    type: Accelerator
    count: Annotated[int, Field(ge=1)] = 1

    def __str__(self) -> str:
        return f"{self.type.value}:{self.count}"

    @classmethod
    def parse(cls, text: str) -> AcceleratorSpec:
        name, _, count = text.strip().partition(":")
        expected = "expected TYPE[:COUNT] with TYPE one of " + ", ".join(ACCELERATOR_NAMES)
        if name.upper() not in ACCELERATOR_NAMES:
            close = difflib.get_close_matches(name.upper(), ACCELERATOR_NAMES, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown accelerator '{name}'; {expected}{hint}")
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"accelerator count '{count}' must be a positive integer; {expected}")
        return cls(type=Accelerator(name.upper()), count=int(count) if count else 1)


class Resources(StrictModel):
    accelerator: AcceleratorSpec | None = None
    cpu: str = "1"
    memory: str = "2Gi"
    use_gpu: bool | None = None
    node_count: Annotated[int, Field(strict=True, ge=1)] | None = None

    @field_validator("accelerator", mode="before")
    @classmethod
    def _parse_accelerator(cls, value: Any) -> Any:
        if isinstance(value, str):
            return AcceleratorSpec.parse(value)
        if value is not None and not isinstance(value, dict | AcceleratorSpec):
            raise ValueError(f"expected a string TYPE[:COUNT] such as 'H100:2', got {value!r}")
        return value

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity_as_text(cls, value: Any) -> Any:
        # `cpu: 4` is as natural as `cpu: "4"`; Truss stores both as strings.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str) -> str:
        if not _CPU.match(value):
            raise ValueError(f"expected a CPU count such as '4', '0.5' or '500m', got '{value}'")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not _MEMORY.match(value):
            raise ValueError(
                f"expected a Kubernetes memory quantity such as '64Gi' or '512Mi', got '{value}'"
            )
        return value

    @model_validator(mode="after")
    def _gpu_flag_agrees(self) -> Resources:
        check_all(
            (
                self.use_gpu is True and self.accelerator is None,
                ("use_gpu",),
                "use_gpu: true needs resources.accelerator (e.g. 'H100:1')",
            ),
            (
                self.use_gpu is False and self.accelerator is not None,
                ("use_gpu",),
                "use_gpu: false contradicts resources.accelerator; remove one of them",
            ),
        )
        return self

    @property
    def gpus_per_node(self) -> int:
        return self.accelerator.count if self.accelerator else 0

    @property
    def nodes(self) -> int:
        return self.node_count or 1

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes
