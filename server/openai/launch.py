"""Deployment spec -> engine -> server: what `bisllm serve` runs.

Data flows one way: the validated config's DeploymentSpec gives the engine's sizes, the model
directory and the served model name; nothing here reads the YAML itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from bisllm_server.disagg.endpoint import add_prefill_route
from bisllm_server.disagg.metrics import TransferMetrics
from bisllm_server.disagg.transfer import KVPuller
from bisllm_server.engine.async_engine import AsyncEngine
from bisllm_server.engine.config import EngineConfig
from bisllm_server.engine.engine import LLMEngine
from bisllm_server.engine.parallel.lockstep import StepLeader, StepPacer
from bisllm_server.engine.parallel.tensor_parallel import SINGLE, TPGroup
from bisllm_server.openai.app import create_app
from bisllm_server.openai.kv_event_stream import KVEventLog
from bisllm_server.openai.metrics import ServerMetrics
from bisllm_server.openai.serving import OpenAIServing, ServerSettings

log = logging.getLogger("bisllm.server")


class ModelDirectoryError(FileNotFoundError):
    """The spec's checkpoint is not on this machine (not hydrated, or a wrong path)."""


@dataclass
class RankEngine:
    """How this rank's engine takes part in a parallel replica (see ranks.py)."""

    tp: TPGroup = SINGLE
    lockstep: StepLeader | None = None
    pacer: StepPacer | None = None  # None: step whenever there is work
    on_error: Callable[[BaseException], None] | None = None


@dataclass
class ServeOptions:
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"
    api_key: str | None = None
    max_queued_requests: int = 1024
    strict_model_name: bool = False
    kv_cache_bytes: int | None = None
    # Where relative local paths (a LOCAL checkpoint, an Eagle head) may be found.
    search_roots: list[Path] = field(default_factory=list)
    # Disaggregated serving: the pool this worker is announced in to the router ("both": an
    # aggregated worker). Every worker can prefill for a peer and pull K/V from one.
    role: str = "both"


def resolve_model_dir(spec: Any, roots: list[Path]) -> Path:
    """Where the checkpoint is: the spec's `model_path` (the hydrated mount in a container),
    else, for a LOCAL checkpoint, its directory as given or under one of `roots` (e.g. the
    working directory, the config's directory, the repository)."""
    candidates = [Path(spec.checkpoint.model_path)]
    source = spec.checkpoint.source_uri or ""
    if source.startswith("file://"):
        local = Path(source.removeprefix("file://"))
        candidates.append(local)
        if not local.is_absolute():
            candidates += [root / local for root in roots]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ModelDirectoryError(
        f"no checkpoint (config.json) found for {spec.served_model_name}; looked in {tried}. "
        "Hydrate the weights first (bisllm hydrate) or point llm_config.model_path at them."
    )


def _device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_draft_dir(spec: Any, roots: list[Path]) -> Path:
    """The Eagle head's directory: `speculative_model_dir` itself (the hydrated mount in a
    container), the same place in a `file://` weights source that mounts it, or the path
    under one of `roots` when it is relative."""
    directory = spec.speculation.speculative_model_dir
    path = Path(directory)
    candidates = [path]
    for mount in spec.weights:
        location = Path(mount.mount_location)
        if mount.source.startswith("file://") and path.is_relative_to(location):
            candidates.append(
                Path(mount.source.removeprefix("file://")) / path.relative_to(location)
            )
    if not path.is_absolute():
        candidates += [root / path for root in roots]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ModelDirectoryError(
        f"speculative_config.speculative_model_dir: no Eagle head (config.json) found; looked "
        f"in {tried}. Hydrate its weights mount first (bisllm hydrate)."
    )


def _speculate(config: EngineConfig, spec: Any, roots: list[Path]) -> None:
    """speculative_config -> engine settings."""
    speculation = spec.speculation
    if speculation is None:
        return
    config.num_draft_tokens = speculation.max_draft_len
    if speculation.decoding_type == "NGram":
        config.speculative_method = "ngram"
    elif speculation.decoding_type == "MTP":
        # The engine drafts with the first NextN layer, chained (as SGLang and vLLM do);
        # a checkpoint without one fails at startup, naming what is missing.
        config.speculative_method = "mtp"
    else:
        config.speculative_method = "eagle"
        config.speculative_model = resolve_draft_dir(spec, roots)
        # eagle3_one_model needs nothing here: head and target already share one process.


def engine_config(spec: Any, model_dir: Path, options: ServeOptions) -> EngineConfig:
    """The engine's settings for a deployment spec."""
    engine_spec = spec.engine
    config = EngineConfig(
        model=model_dir,
        dtype=options.dtype,
        device=_device(options.device),
        max_batch_size=engine_spec.max_batch_size,
        max_num_tokens=engine_spec.max_num_tokens,
        max_seq_len=engine_spec.max_seq_len,
        enable_chunked_prefill=engine_spec.enable_chunked_prefill,
    )
    if options.kv_cache_bytes is not None:
        config.kv_cache_bytes = options.kv_cache_bytes
    _speculate(config, spec, [*options.search_roots, Path.cwd(), model_dir.parent])
    return config


def build_server(
    spec: Any,
    model_dir: Path,
    options: ServeOptions,
    *,
    rank: RankEngine | None = None,
) -> tuple[Any, AsyncEngine]:
    """(FastAPI app, started AsyncEngine) for a deployment spec; `rank`: this process is one
    rank of a parallel replica (ranks.py)."""
    config = engine_config(spec, model_dir, options)
    rank = rank or RankEngine()
    llm = LLMEngine(config, tp=rank.tp, lockstep=rank.lockstep)
    # Subscribed before the engine thread starts, so the log sees every event from id 1.
    kv_event_log = KVEventLog(llm.kv_events, block_size=config.page_size, role=options.role)
    engine = AsyncEngine(llm, pacer=rank.pacer, on_error=rank.on_error)
    engine.start()
    settings = ServerSettings(
        served_model_name=spec.served_model_name,
        api_key=options.api_key or os.environ.get("BISLLM_API_KEY") or None,
        max_queued_requests=options.max_queued_requests,
        strict_model_name=options.strict_model_name,
    )
    metrics = ServerMetrics(spec.served_model_name)
    serving = OpenAIServing(engine, settings, metrics)
    serving.kv_event_log = kv_event_log
    transfers = TransferMetrics(metrics.registry, spec.served_model_name)
    key = settings.api_key
    serving.kv_puller = KVPuller(
        transfers, headers={"Authorization": f"Bearer {key}"} if key else None
    )
    metrics.set_status("active")
    app = create_app(serving)
    add_prefill_route(app, engine, transfers)
    app.state.kv_event_log = kv_event_log
    app.router.on_shutdown.append(serving.kv_puller.aclose)
    return app, engine


class WorkerServer(uvicorn.Server):
    """uvicorn for a worker: on SIGTERM/SIGINT it first ends the routers' KV event streams,
    which never end by themselves, so the graceful shutdown waits only for real requests."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        event_log = getattr(self.config.app.state, "kv_event_log", None)
        if event_log is not None:
            event_log.end_streams()
        super().handle_exit(sig, frame)
