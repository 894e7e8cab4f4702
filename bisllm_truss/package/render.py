"""Render the three package targets from a DeploymentSpec, entirely in memory."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from bisllm_templates import TEMPLATE_ROOT
from bisllm_truss import __version__
from bisllm_truss.package.outdir import MARKER
from bisllm_truss.spec import DeploymentSpec

TARGETS = ("truss", "docker", "k8s")
SERVER_PORT = 8000  # 8080 belongs to Truss's proxy inside the container
VENV = "/opt/bisllm"
# CUDA runtime base, pinned by tag; torch comes from the matching PyTorch wheel index.
BASE_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
TORCH_VERSION = "2.13.0"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cu128"
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/bisllm/bisllm-runtime"
DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
# Packages copied into the Docker context; together they are this distribution.
SOURCE_PACKAGES = ("bisllm_truss", "bisllm_server", "bisllm_bdn", "bisllm_templates")
# Weight-source schemes `truss push` can deliver (Truss's WeightsSource).
TRUSS_SCHEMES = ("hf", "s3", "gs", "azure", "r2", "cw", "https")
# Multi-node engines: one LeaderWorkerSet group per engine, one pod per node.
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
# LWS labels every pod with its index in the group; the leader (node 0) is "0".
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
# torch.distributed's rendezvous on the leader (`--master-port`).
RENDEZVOUS_PORT = 29500
# An LWS named N runs StatefulSets N (leaders) and N-<group> (each group's workers), whose pods
# carry the label controller-revision-hash=<statefulset>-<10-char hash> (63 characters at
# most): N of 48 characters leaves room for 999 groups.
LWS_NAME_MAX = 48


class PackageError(Exception):
    """The spec cannot be packaged for a requested target; nothing was written."""


@dataclass(frozen=True)
class PackageOptions:
    targets: tuple[str, ...] = TARGETS
    image_repository: str = DEFAULT_IMAGE_REPOSITORY
    prometheus_address: str = DEFAULT_PROMETHEUS
    # Weights manifests from `bisllm mirror`, as (file name, JSON text): the Kubernetes
    # ConfigMap carries them next to the config, where `bisllm serve` hydrates them from.
    manifests: tuple[tuple[str, str], ...] = ()


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATE_ROOT)),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    # JSON is valid YAML; emitting every value through it makes quoting correct by construction.
    env.filters["json"] = lambda value: json.dumps(value, sort_keys=True, ensure_ascii=False)
    return env


def k8s_name(text: str) -> str:
    """A DNS-1123 label derived from `text` (Kubernetes object names)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (slug or "bisllm")[:40].rstrip("-")


def image_ref(spec: DeploymentSpec, options: PackageOptions) -> str:
    return f"{options.image_repository}:{spec.runtime_image_tag or __version__}"


def render_package(
    spec: DeploymentSpec, source_text: str, options: PackageOptions | None = None
) -> dict[str, bytes]:
    """Every output file, keyed by its path relative to the output directory."""
    options = options or PackageOptions()
    unknown = sorted(set(options.targets) - set(TARGETS))
    if unknown or not options.targets:
        raise PackageError(f"unknown target(s) {unknown}; expected some of: {', '.join(TARGETS)}")
    env = _environment()
    files: dict[str, bytes] = {
        MARKER: (
            f"bisllm-truss {__version__}\nsource sha256 {spec.source_config_sha256}\n"
            f"targets {' '.join(t for t in TARGETS if t in options.targets)}\n"
        ).encode()
    }
    context = {
        "spec": spec,
        "plugin_version": __version__,
        "image": image_ref(spec, options),
        "server_port": SERVER_PORT,
    }
    if "truss" in options.targets:
        files.update(_truss_dir(env, spec, source_text, context))
    if "docker" in options.targets:
        files.update(_docker_context(env, spec, source_text, context))
    if "k8s" in options.targets:
        files.update(_kubernetes(env, spec, source_text, options, context))
    return files


def _truss_dir(
    env: Environment, spec: DeploymentSpec, source_text: str, context: dict[str, Any]
) -> dict[str, bytes]:
    for mount in spec.weights:
        scheme = mount.source.partition("://")[0]
        if scheme not in TRUSS_SCHEMES:
            raise PackageError(
                f"weights source '{mount.source}' uses {scheme}://, which truss push cannot "
                f"deliver (expected one of {', '.join(s + '://' for s in TRUSS_SCHEMES)}); "
                "package with --target docker,k8s for self-hosting instead"
            )
    config_path = "/app/data/bisllm/config.yaml"
    environment = dict(spec.environment_variables)
    environment["BISLLM_SPEC"] = "/app/data/bisllm/spec.json"
    metadata = dict(spec.model_metadata)
    metadata["bisllm"] = {
        "plugin_version": __version__,
        "source_config_sha256": spec.source_config_sha256,
        "served_model_name": spec.served_model_name,
        "autoscaling": spec.autoscaling.model_dump(mode="json"),
    }
    tags = list(metadata.get("tags", []))
    if "openai-compatible" not in tags:
        tags.append("openai-compatible")
    metadata["tags"] = tags
    config = env.get_template("truss/config.yaml.jinja").render(
        **context,
        truss_dir_hint="<out>/truss",
        python_executable=f"{VENV}/bin/python",
        start_command=f"bisllm serve {config_path} --host 0.0.0.0 --port {SERVER_PORT}",
        predict_concurrency=max(256, spec.engine.max_batch_size * 2),
        environment=environment,
        model_metadata=metadata,
    )
    return {
        "truss/config.yaml": config.encode(),
        "truss/data/bisllm/config.yaml": source_text.encode(),
        "truss/data/bisllm/spec.json": spec.to_json().encode(),
    }


def _dependencies() -> list[str]:
    """This distribution's runtime requirements (extras excluded), for the image's install."""
    requirements = importlib.metadata.requires("bisllm-truss") or []
    return sorted(r for r in requirements if "extra ==" not in r)


def _source_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for package in SOURCE_PACKAGES:
        root = Path(importlib.import_module(package).__file__ or "").parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files[f"docker/src/{package}/{path.relative_to(root).as_posix()}"] = (
                    path.read_bytes()
                )
    return files


def _docker_context(
    env: Environment, spec: DeploymentSpec, source_text: str, context: dict[str, Any]
) -> dict[str, bytes]:
    dockerfile = env.get_template("docker/Dockerfile.jinja").render(
        **context,
        base_image=BASE_IMAGE,
        venv=VENV,
        torch_version=TORCH_VERSION,
        torch_index_url=TORCH_INDEX_URL,
    )
    pyproject = env.get_template("docker/pyproject.toml.jinja").render(
        **context, dependencies=_dependencies(), packages=[f"{p}*" for p in SOURCE_PACKAGES]
    )
    files = {
        "docker/Dockerfile": dockerfile.encode(),
        "docker/.dockerignore": env.get_template("docker/dockerignore.jinja").render().encode(),
        "docker/src/pyproject.toml": pyproject.encode(),
        "docker/bisllm/config.yaml": source_text.encode(),
        "docker/bisllm/spec.json": spec.to_json().encode(),
    }
    files.update(_source_files())
    return files


def _scale_down_step(spec: DeploymentSpec) -> tuple[int, int, int]:
    """The gradual scale-down handed to the HPA: (percent, its period, the period of the
    one-replica policy). The HPA rounds a percentage step up to whole replicas kept, so on its
    own 20% of 4 replicas removes none; the one-replica policy (selectPolicy Max) guarantees
    progress, as the local policy's "at least one per step" does."""
    scaling = spec.autoscaling
    # The HPA accepts policy periods of 1 s to 30 min.
    period = min(max(scaling.scale_down_delay, 15), 1800)
    if scaling.scale_down_policy == "half_life":
        half_life = scaling.scale_down_half_life_seconds
        assert half_life is not None
        # Removing this share every `period` halves the replica count once per half-life; a
        # strict exponential takes one half-life to go from 2 replicas to 1.
        share = 1 - 0.5 ** (period / half_life)
        return max(1, math.ceil(share * 100)), period, min(max(half_life, period), 1800)
    assert scaling.max_scale_down_rate is not None
    return max(1, math.ceil(scaling.max_scale_down_rate)), period, period


@dataclass(frozen=True)
class PodLayout:
    """How one engine replica of the spec maps onto pods."""

    nodes: int  # pods per engine, one per node; > 1: a LeaderWorkerSet group of that size
    engines: int  # engine groups per deployment replica (LWS); 1 for a Deployment
    gpus: int  # GPUs per pod
    http_ports: tuple[int, ...]  # the ports a serving pod answers HTTP on
    dp_attention: bool  # every rank serves HTTP on its own port (`--no-router`)

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1


def pod_layout(spec: DeploymentSpec) -> PodLayout:
    """Pods per engine, GPUs per pod and HTTP ports per pod; refuses what has no manifest."""
    hardware, parallel = spec.hardware, spec.parallel
    if hardware.node_count == 1 and not parallel.enable_attention_dp:
        return PodLayout(1, 1, hardware.gpus_per_node, (SERVER_PORT,), dp_attention=False)
    # Imported here: the engine's layout arithmetic pulls in torch, which single-node
    # packaging without DP attention does not need.
    from bisllm_server.engine.parallel.state import ParallelConfig, ParallelConfigError

    try:
        config = ParallelConfig.from_spec(parallel, hardware)
    except ParallelConfigError as exc:
        raise PackageError(f"the parallel layout does not fit resources: {exc}") from None
    nodes = hardware.node_count
    if nodes > 1 and config.node_count == 1:
        dp = parallel.data_parallel_size
        raise PackageError(
            f"llm_config.data_parallel_size {dp} >= resources.node_count {nodes}: every engine "
            f"fits on one node, so a replica is {nodes} unrelated nodes, which has no "
            f"Kubernetes manifest; set node_count: 1 and data_parallel_size: {dp // nodes}, "
            f"and multiply min_replica and max_replica by {nodes}"
        )
    multi_node = config.node_count > 1
    # With DP attention each rank on a pod serves HTTP on 8000 + its local rank.
    ports = config.procs_per_node if parallel.enable_attention_dp else 1
    return PodLayout(
        nodes=config.node_count,
        engines=parallel.data_parallel_size if multi_node else 1,
        gpus=config.procs_per_node if multi_node else hardware.gpus_per_node,
        http_ports=tuple(range(SERVER_PORT, SERVER_PORT + ports)),
        dp_attention=parallel.enable_attention_dp,
    )


def _worker_args(role: str, layout: PodLayout) -> list[str]:
    """`bisllm serve` arguments of a worker pod (the image's entrypoint is `bisllm serve`)."""
    args = ["/etc/bisllm/config.yaml", "--role", role, "--host", "0.0.0.0"]
    args += ["--port", str(SERVER_PORT)]
    if layout.multi_node:
        # LWS puts these into every pod's environment; Kubernetes expands $(VAR) in args.
        args += ["--nnodes", "$(LWS_GROUP_SIZE)", "--node-rank", "$(LWS_WORKER_INDEX)"]
        args += ["--master-addr", "$(LWS_LEADER_ADDRESS)"]
        args += ["--master-port", str(RENDEZVOUS_PORT)]
    if layout.dp_attention:
        args.append("--no-router")
    return args


def _worker_pools(
    spec: DeploymentSpec, workers: str, labels: dict[str, str], layout: PodLayout
) -> list[dict[str, Any]]:
    """The worker pools: one aggregated pool, or the prefill and decode pools of a
    disaggregated deployment, each scaled by KEDA on its own pods' in-flight tokens. A pool is
    a Deployment (one pod per engine) or, for multi-node engines, a LeaderWorkerSet (one group
    of `layout.nodes` pods per engine)."""
    scaling = spec.autoscaling
    model = json.dumps(spec.model_name)
    if not spec.disaggregation.enabled:
        roles = [("worker", workers, 1, "")]
    else:
        d = spec.disaggregation
        roles = [
            ("prefill", f"{workers}-prefill", d.prefill_workers_per_replica, "prefill"),
            ("decode", f"{workers}-decode", d.decode_workers_per_replica, "decode"),
        ]
    pools = []
    for role, name, per_unit, component in roles:
        selector = {**labels, "app.kubernetes.io/component": component or "worker"}
        selector.pop("app.kubernetes.io/managed-by")
        # A Deployment's pods are NAME-<replicaset hash>-<pod hash>; a LeaderWorkerSet's
        # NAME-<group> (leaders) and NAME-<group>-<index> (the other nodes).
        pod_names = "[0-9]+(-[0-9]+)?" if layout.multi_node else "[a-z0-9]+-[a-z0-9]+"
        pods = f', pod=~"{name}-{pod_names}"' if component else ""
        service_selector = dict(selector)
        if layout.multi_node and not layout.dp_attention:
            # Only the leader serves HTTP (and exports metrics) for a tensor-parallel engine.
            service_selector[LWS_WORKER_INDEX_LABEL] = "0"
        # Engine groups: a deployment replica holds data_parallel_size multi-node engines.
        per_unit *= layout.engines
        pools.append(
            {
                "name": name,
                "role": role,
                "per_unit": per_unit,
                "selector": selector,
                "labels": {**labels, **selector},
                "kind": "LeaderWorkerSet" if layout.multi_node else "Deployment",
                "api_version": LWS_API_VERSION if layout.multi_node else "apps/v1",
                # LWS creates a headless Service named after itself for its pods' DNS (every
                # pod, ready or not: the workers rendezvous there); the router's is another.
                "service": f"{name}-http" if layout.multi_node else name,
                "service_selector": service_selector,
                "args": _worker_args(role, layout),
                "min_replicas": scaling.min_replica * per_unit,
                "max_replicas": scaling.max_replica * per_unit,
                # Sum over the pool's workers of each one's in-flight tokens, averaged over
                # the window.
                "query": (
                    f"sum(avg_over_time(bisllm_in_flight_tokens{{model_name={model}{pods}}}"
                    f"[{scaling.autoscaling_window}s]))"
                ),
            }
        )
    return pools


def _kubernetes(
    env: Environment,
    spec: DeploymentSpec,
    source_text: str,
    options: PackageOptions,
    context: dict[str, Any],
) -> dict[str, bytes]:
    layout = pod_layout(spec)
    base = k8s_name(spec.model_name)
    if layout.multi_node:
        base = base[: LWS_NAME_MAX - len("-worker")].rstrip("-")
    names = {
        "workers": f"{base}-worker",
        "router": f"{base}-router",
        "config": f"{base}-config",
        "secrets": f"{base}-secrets",
    }
    labels = {"app.kubernetes.io/name": base, "app.kubernetes.io/managed-by": "bisllm"}
    router_selector = {"app.kubernetes.io/name": base, "app.kubernetes.io/component": "router"}
    env_list = [{"name": k, "value": v} for k, v in sorted(spec.environment_variables.items())]
    env_list.append({"name": "BISLLM_SPEC", "value": "/etc/bisllm/spec.json"})
    percent, period, single_period = _scale_down_step(spec)
    pools = _worker_pools(spec, names["workers"], labels, layout)
    values = {
        **context,
        "names": names,
        "labels": labels,
        "router_labels": {**labels, **router_selector},
        "router_selector": router_selector,
        "env_list": env_list,
        "source_config": source_text,
        "spec_json": spec.to_json(),
        "manifests": dict(options.manifests),
        "prometheus_address": options.prometheus_address,
        "layout": layout,
        "rendezvous_port": RENDEZVOUS_PORT,
        "pools": pools,
        # A headless Service name resolves to every pod it selects; under DP attention each
        # port is one more rank on each of them.
        "worker_targets": ",".join(
            f"{pool['service']}:{port}" for pool in pools for port in layout.http_ports
        ),
        "scale_down_percent": percent,
        "scale_down_period": period,
        "single_replica_period": single_period,
    }
    return {
        f"k8s/{name}.yaml": env.get_template(f"k8s/{name}.yaml.jinja").render(**values).encode()
        for name in ("configmap", "workers", "router", "keda-scaledobject")
    }
