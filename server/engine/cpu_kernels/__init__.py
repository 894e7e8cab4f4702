"""C++ kernels for the CPU decode hot paths, compiled on first use.

On a CPU, a decode step of a small MoE model is bound by the number of eager ops, not by
arithmetic: gathered K/V copies, masks, padded expert groups. `kernels.cpp` does decode
attention straight over the paged pool and the routed experts of a small batch as one op each
(`torch.ops.bisllm_cpu.*`).

They are built with torch's cpp_extension: a C++ compiler, plus ninja, which the project
depends on. The build takes 10-30 s once and is then cached per source, torch version and
CPU. Where it is impossible, `available()` is False, the reason is logged once, and the
engine keeps its pure-PyTorch paths, which compute the same thing. `BISLLM_CPU_KERNELS=0`
turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
DISABLE_ENV = "BISLLM_CPU_KERNELS"

_lock = threading.Lock()
_loaded: bool | None = None
_failure: str | None = None


def _cpu_flags() -> str:
    """The CPU's feature flags: the build uses -march=native, so it is cached per CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_directory() -> Path:
    key = hashlib.sha256(
        SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    root = os.environ.get("BISLLM_KERNEL_CACHE") or Path.home() / ".cache" / "bisllm" / "kernels"
    path = Path(root) / f"cpu-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ensure_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the `ninja` wheel's binary is not there unless
    the virtualenv is activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_and_load() -> None:
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    logger.info("building the CPU kernels (once per machine and torch version)")
    load(
        name="bisllm_cpu_kernels",
        sources=[str(SOURCE)],
        build_directory=str(_build_directory()),
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def available() -> bool:
    """Whether torch.ops.bisllm_cpu is usable, building it on the first call."""
    global _loaded, _failure
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    with _lock:
        if _loaded is None:
            try:
                _build_and_load()
                _loaded = True
            except Exception as exc:  # no compiler, no ninja, a build error: keep PyTorch paths
                _loaded, _failure = False, f"{type(exc).__name__}: {exc}"
                logger.warning("CPU kernels unavailable, using PyTorch paths: %s", _failure)
        return _loaded


def failure() -> str | None:
    """Why the build failed, if it did."""
    return _failure
