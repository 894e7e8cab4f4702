"""`bisllm package` and `bisllm push`, checked against the real consumers of their output.

* Every example config is packaged (in process through click, and again as a real subprocess of
  the installed `bisllm` script). The truss dir is loaded by Truss's own `TrussConfig` and turned
  into a Docker build context by the real `truss image build-context`, offline.
* The Kubernetes manifests pass `kubernetes_validate` (strict) and the KEDA ScaledObject passes
  tests/schemas/keda-scaledobject-v1alpha1.json.
* Packaging is deterministic, refusals write nothing, and `bisllm push` hands the truss dir to
  whatever `truss` is on PATH.
"""

from __future__ import annotations

import configparser
import copy
import hashlib
import json
import math
import os
import re
import stat
import subprocess
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner, Result
from truss.base.truss_config import TrussConfig

from bisllm_truss.cli import main
from bisllm_truss.package.outdir import MARKER
from bisllm_truss.package.render import PackageOptions, image_ref
from bisllm_truss.spec import DeploymentSpec
from bisllm_truss.validate import validate_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(sysconfig.get_path("scripts"))
BISLLM = SCRIPTS / "bisllm"
TRUSS = SCRIPTS / "truss"
KEDA_SCHEMA = Path(__file__).resolve().parent / "schemas" / "keda-scaledobject-v1alpha1.json"
KUBERNETES_VERSION = "1.37.0"

# v1 configs must go through `bisllm migrate` before they can be packaged.
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if not p.name.startswith("v1-"))
EXAMPLE_IDS = [p.stem for p in EXAMPLES]

SERVER_PORT = 8000
CONFIG_IN_IMAGE = "/app/data/bisllm/config.yaml"
START_COMMAND = f"bisllm serve {CONFIG_IN_IMAGE} --host 0.0.0.0 --port {SERVER_PORT}"
# Truss's default .truss_ignore drops these, so shipped files must never live under them.
IGNORED_BY_TRUSS = {"build", "dist", "lib", "lib64", "var", "__pycache__"}

# The smallest config the refusal and push tests package.
SMALL_CONFIG = """\
model_name: tiny-moe
resources:
  accelerator: H100:2
  use_gpu: true
trt_llm:
  inference_stack: v2
  build:
    checkpoint_repository:
      source: HF
      repo: Qwen/Qwen3-30B-A3B
  runtime:
    tensor_parallel_size: 2
"""

RUNNER = CliRunner()


# --------------------------------------------------------------------------------------------
# helpers


def tree(root: Path) -> dict[str, tuple[str, bytes | str | None, int]]:
    """Everything under `root`: relative path → (kind, content, permission bits)."""
    entries: dict[str, tuple[str, bytes | str | None, int]] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            entries[name] = ("link", os.readlink(path), mode)
        elif path.is_dir():
            entries[name] = ("dir", None, mode)
        else:
            entries[name] = ("file", path.read_bytes(), mode)
    return entries


def snapshot(paths: list[Path]) -> dict[str, Any]:
    """What `paths` hold now; `/` only by its top-level names (never walked)."""
    state: dict[str, Any] = {}
    for path in paths:
        if path == Path(path.anchor):
            state[str(path)] = sorted(os.listdir(path))
        else:
            state[str(path)] = tree(path) if path.exists() else None
    return state


def package(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    return RUNNER.invoke(main, ["package", *map(str, args)], env=env)


def write_config(path: Path, text: str = SMALL_CONFIG) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def all_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from all_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_keys(item)


def k8s_documents(out: Path) -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted((out / "k8s").glob("*.yaml")):
        loaded = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        assert loaded, f"{path.name} holds no Kubernetes object"
        documents.extend(loaded)
    return documents


def only(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [d for d in documents if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def gpu_count(raw_accelerator: Any) -> int:
    """GPUs per replica, read straight from the user's `resources.accelerator`."""
    if isinstance(raw_accelerator, dict):
        return int(raw_accelerator.get("count", 1))
    _, _, count = str(raw_accelerator).partition(":")
    return int(count) if count else 1


def keda_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(KEDA_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def keda_errors(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in keda_validator().iter_errors(document)
    ]


def start(args: list[str | Path], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(a) for a in args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# --------------------------------------------------------------------------------------------
# every example, packaged once per module


@dataclass
class Packaged:
    example: Path
    source: bytes
    raw: dict[str, Any]
    spec: DeploymentSpec
    out: Path  # written in process through CliRunner
    result: Result
    again: Path  # the same config, written by a `bisllm` subprocess
    again_run: subprocess.CompletedProcess[str]
    context: Path  # `truss image build-context` of out/truss
    context_run: subprocess.CompletedProcess[str] | None

    @property
    def truss_config(self) -> dict[str, Any]:
        return yaml.safe_load((self.out / "truss" / "config.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Packaged]:
    base = tmp_path_factory.mktemp("examples")
    truss_home = tmp_path_factory.mktemp("truss-home")
    env = {**os.environ, "TRUSS_NO_UPDATE_CHECK": "1"}
    truss_env = {**env, "HOME": str(truss_home)}

    for example in EXAMPLES:
        for parent in ("cli", "subprocess"):
            (base / example.stem / parent).mkdir(parents=True)
    # Start the subprocess packagings first; they run while the in-process ones do.
    again_runs = {
        example.stem: start(
            [BISLLM, "package", example, "-o", base / example.stem / "subprocess" / "out"],
            env,
            base,
        )
        for example in EXAMPLES
    }
    results = {
        example.stem: package(example, "-o", base / example.stem / "cli" / "out")
        for example in EXAMPLES
    }
    context_runs = {
        example.stem: start(
            [
                TRUSS,
                "image",
                "build-context",
                base / example.stem / "context",
                base / example.stem / "cli" / "out" / "truss",
            ],
            truss_env,
            base,
        )
        for example in EXAMPLES
        if results[example.stem].exit_code == 0
    }
    packages = {}
    for example in EXAMPLES:
        validation = validate_file(example)
        assert validation.ok and validation.spec is not None, validation.report()
        packages[example.stem] = Packaged(
            example=example,
            source=example.read_bytes(),
            raw=yaml.safe_load(example.read_text(encoding="utf-8")),
            spec=validation.spec,
            out=base / example.stem / "cli" / "out",
            result=results[example.stem],
            again=base / example.stem / "subprocess" / "out",
            again_run=finish(again_runs[example.stem]),
            context=base / example.stem / "context",
            context_run=finish(context_runs[example.stem])
            if example.stem in context_runs
            else None,
        )
    return packages


@pytest.fixture(params=EXAMPLES, ids=EXAMPLE_IDS)
def pkg(request: pytest.FixtureRequest, packaged: dict[str, Packaged]) -> Packaged:
    return packaged[request.param.stem]


def test_there_are_enough_examples() -> None:
    assert len(EXAMPLES) >= 8, f"expected at least 8 v2 examples, found {EXAMPLE_IDS}"


# --------------------------------------------------------------------------------------------
# 1. the truss dir


def test_package_succeeds(pkg: Packaged) -> None:
    assert pkg.result.exit_code == 0, pkg.result.output
    assert f"Next: truss push {pkg.out.resolve() / 'truss'}" in pkg.result.stdout
    assert pkg.result.stderr == ""
    # Written in place: nothing left beside the output directory (staging or retired trees).
    assert sorted(os.listdir(pkg.out.parent)) == ["out"]
    assert sorted(os.listdir(pkg.out)) == sorted([MARKER, "docker", "k8s", "truss"])
    marker = (pkg.out / MARKER).read_text(encoding="utf-8")
    assert hashlib.sha256(pkg.source).hexdigest() in marker


def test_package_subprocess_succeeds(pkg: Packaged) -> None:
    run = pkg.again_run
    assert run.returncode == 0, run.stderr
    assert f"Next: truss push {pkg.again.resolve() / 'truss'}" in run.stdout
    assert sorted(os.listdir(pkg.again.parent)) == ["out"]


def test_truss_accepts_config(pkg: Packaged) -> None:
    config = TrussConfig.from_yaml(pkg.out / "truss" / "config.yaml")
    config.validate_forbid_extra()

    assert config.model_name == pkg.spec.model_name
    assert config.base_image is not None
    assert config.base_image.image == image_ref(pkg.spec, PackageOptions())
    assert config.base_image.python_executable_path.startswith("/")
    server = config.docker_server
    assert server is not None
    assert server.start_command == START_COMMAND
    assert server.server_port == SERVER_PORT != 8080  # 8080 is Truss's own proxy
    assert server.predict_endpoint == "/v1/chat/completions"
    accelerator = pkg.raw["resources"].get("accelerator")
    if accelerator:
        assert config.resources.accelerator.count == gpu_count(accelerator)
        assert config.resources.use_gpu
    # Truss turns non-string environment values into strings behind our back; we never rely on it.
    raw_env = pkg.truss_config["environment_variables"]
    assert all(isinstance(v, str) for v in raw_env.values()), raw_env
    for key, value in (pkg.raw.get("environment_variables") or {}).items():
        assert raw_env[key] == str(value)


def test_truss_dir_layout(pkg: Packaged) -> None:
    truss_dir = pkg.out / "truss"
    names = [p.relative_to(truss_dir) for p in truss_dir.rglob("*")]
    assert not (truss_dir / "model").exists(), "a model/ dir would make Truss load a Python model"
    for name in names:
        assert not set(name.parts) & IGNORED_BY_TRUSS, f"{name} would be dropped by .truss_ignore"
        assert name.suffix != ".so", f"{name} would be dropped by .truss_ignore"

    config = pkg.truss_config
    keys = set(all_keys(config))
    assert "trt_llm" not in keys, "a trt_llm key makes Baseten swap in its own image"
    assert "bis_llm" not in config and "bisllm" not in config
    provenance = config["model_metadata"]["bisllm"]
    assert provenance["source_config_sha256"] == hashlib.sha256(pkg.source).hexdigest()

    shipped_spec = (truss_dir / "data" / "bisllm" / "spec.json").read_text(encoding="utf-8")
    assert json.loads(shipped_spec) == json.loads(pkg.spec.to_json())
    assert shipped_spec == pkg.spec.to_json()
    assert (truss_dir / "data" / "bisllm" / "config.yaml").read_bytes() == pkg.source


def test_truss_build_context(pkg: Packaged) -> None:
    run = pkg.context_run
    assert run is not None, "packaging failed, so there is no truss dir to build"
    assert run.returncode == 0, run.stdout + run.stderr
    context = pkg.context

    image = image_ref(pkg.spec, PackageOptions())
    dockerfile = (context / "Dockerfile").read_text(encoding="utf-8").splitlines()
    from_lines = [line for line in dockerfile if line.startswith("FROM ")]
    assert from_lines, "no FROM in the Dockerfile"
    assert from_lines[0].split()[1] == image
    entrypoints = [line for line in dockerfile if line.startswith("ENTRYPOINT")]
    assert entrypoints and "supervisord" in entrypoints[-1]

    supervisord = configparser.ConfigParser(interpolation=None)
    supervisord.read_string((context / "supervisord.conf").read_text(encoding="utf-8"))
    command = supervisord["program:model-server"]["command"]
    assert command == START_COMMAND
    assert command.startswith(f"bisllm serve {CONFIG_IN_IMAGE} ")

    proxy = (context / "proxy.conf").read_text(encoding="utf-8")
    assert re.search(r"^\s*listen 8080;", proxy, re.MULTILINE)
    upstreams = set(re.findall(r"proxy_pass\s+(\S+?);", proxy))
    assert upstreams == {f"http://127.0.0.1:{SERVER_PORT}"}
    rewrites = set(re.findall(r"rewrite\s+\S+\s+(\S+)\s+break;", proxy))
    assert {"/v1/chat/completions", "/health"} <= rewrites

    # data/ reaches the image (it is copied to /app/data, where the start command reads it).
    assert (context / "data" / "bisllm" / "config.yaml").read_bytes() == pkg.source
    assert (context / "data" / "bisllm" / "spec.json").read_text(encoding="utf-8") == (
        pkg.spec.to_json()
    )


# --------------------------------------------------------------------------------------------
# 2. Kubernetes manifests


def worker_pools(pkg: Packaged) -> dict[str, int]:
    """The worker pools a package should have: role -> workers per replica (unit)."""
    d = pkg.spec.disaggregation
    if not d.enabled:
        return {"worker": 1}
    return {"prefill": d.prefill_workers_per_replica, "decode": d.decode_workers_per_replica}


def http_ports(spec: DeploymentSpec) -> list[int]:
    """The ports a worker pod serves HTTP on: 8000, and under DP attention one more per rank
    of the engine on the pod (its tensor-parallel ranks over the nodes one engine spans)."""
    if not spec.parallel.enable_attention_dp:
        return [SERVER_PORT]
    parallel = spec.parallel
    engine_nodes = max(1, spec.hardware.node_count // parallel.data_parallel_size)
    ranks = parallel.tensor_parallel_size // engine_nodes
    return list(range(SERVER_PORT, SERVER_PORT + ranks))


def test_builtin_manifests_validate(pkg: Packaged) -> None:
    documents = k8s_documents(pkg.out)
    pools = len(worker_pools(pkg))
    assert Counter(d["kind"] for d in documents) == {
        "ConfigMap": 1,
        "Deployment": 1 + pools,  # the router and each pool's workers
        "Service": 1 + pools,
        "ScaledObject": pools,
    }
    for document in documents:
        if document["kind"] == "ScaledObject":
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def role_of(deployment: dict[str, Any]) -> str:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--role") + 1]


def test_keda_scaledobject(pkg: Packaged) -> None:
    documents = k8s_documents(pkg.out)
    pools = worker_pools(pkg)
    scaled_objects = [d for d in documents if d["kind"] == "ScaledObject"]
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    autoscaling = pkg.spec.autoscaling
    settings = pkg.raw.get("autoscaling_settings") or {}
    scaled_roles = []
    for scaled in scaled_objects:
        assert keda_errors(scaled) == []
        spec = scaled["spec"]
        target = spec["scaleTargetRef"]
        assert target["name"] in deployments, f"scaleTargetRef {target} names no Deployment"
        assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == (
            "apps/v1",
            "Deployment",
        )
        role = role_of(deployments[target["name"]])
        scaled_roles.append(role)
        # Replicas count replication units; a pool has its share of workers in each.
        per_unit = pools[role]
        assert spec["minReplicaCount"] == autoscaling.min_replica * per_unit
        assert autoscaling.min_replica == settings.get("min_replica", 1)
        assert spec["maxReplicaCount"] == autoscaling.max_replica * per_unit
        assert autoscaling.max_replica == settings.get("max_replica", 1)
        assert spec["minReplicaCount"] >= 1, "BIS-LLM never scales to zero"
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert trigger["metadata"]["threshold"] == str(autoscaling.target_in_flight_tokens)
        query = trigger["metadata"]["query"]
        assert pkg.spec.model_name in query
        if len(pools) > 1:  # each pool scales on its own pods' tokens only
            assert f'pod=~"{target["name"]}-' in query
    assert sorted(scaled_roles) == sorted(pools)


def test_worker_resources_and_wiring(pkg: Packaged) -> None:
    documents = k8s_documents(pkg.out)
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    services = [d for d in documents if d["kind"] == "Service"]
    configmap = only(documents, "ConfigMap")
    pools = [
        deployments.pop(d["spec"]["scaleTargetRef"]["name"])
        for d in documents
        if d["kind"] == "ScaledObject"
    ]
    (router,) = deployments.values()
    router_args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    targets = router_args[router_args.index("--workers") + 1].split(",")
    # One target per pool and HTTP port (DP attention: one port per rank on the pod).
    ports = len(http_ports(pkg.spec))
    assert len(targets) == len(pools) * ports
    for index, workers in enumerate(pools):
        check_worker_pool(
            pkg, workers, router, services, targets[index * ports : (index + 1) * ports]
        )
    # Selectors pick the pods they are meant to, and every Service reaches exactly one Deployment.
    for deployment in (*pools, router):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert {"name": "config", "configMap": {"name": configmap["metadata"]["name"]}} in volumes
    for service in services:
        reached = [
            d
            for d in (*pools, router)
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(reached) == 1, f"Service {service['metadata']['name']} selects {len(reached)}"

    assert configmap["data"]["config.yaml"] == pkg.source.decode("utf-8")
    assert configmap["data"]["spec.json"] == pkg.spec.to_json()


def check_worker_pool(
    pkg: Packaged,
    workers: dict[str, Any],
    router: dict[str, Any],
    services: list[dict[str, Any]],
    router_targets: list[str],
) -> None:
    """One pool's worker Deployment: resources, image, labels, ports, its Service, the
    router's addresses for it."""
    assert role_of(workers) in worker_pools(pkg)

    (worker,) = workers["spec"]["template"]["spec"]["containers"]
    resources = worker["resources"]
    accelerator = pkg.raw["resources"].get("accelerator")
    if accelerator:
        gpus = gpu_count(accelerator)
        assert gpus == pkg.spec.hardware.gpus_per_node
        assert resources["requests"]["nvidia.com/gpu"] == gpus
        assert resources["limits"]["nvidia.com/gpu"] == gpus
    else:
        assert "nvidia.com/gpu" not in resources.get("requests", {})
    assert worker["image"] == router["spec"]["template"]["spec"]["containers"][0]["image"]
    assert worker["image"] == image_ref(pkg.spec, PackageOptions())

    # Each rank that serves HTTP has its port (one, without DP attention).
    ports = http_ports(pkg.spec)
    assert [p["containerPort"] for p in worker["ports"]] == ports
    assert ("--no-router" in worker["args"]) == pkg.spec.parallel.enable_attention_dp

    # The router reaches this pool through the one Service selecting its pods, on every port.
    (service,) = [
        s
        for s in services
        if selects(s["spec"]["selector"], workers["spec"]["template"]["metadata"]["labels"])
    ]
    assert service["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in service["spec"]["ports"]] == ports
    assert router_targets == [f"{service['metadata']['name']}:{port}" for port in ports]


def _sample_scaledobject() -> dict[str, Any]:
    return yaml.safe_load(
        """
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: tiny-moe-worker, labels: {app.kubernetes.io/name: tiny-moe}}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: tiny-moe-worker}
  minReplicaCount: 1
  maxReplicaCount: 4
  pollingInterval: 15
  cooldownPeriod: 300
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleUp: {stabilizationWindowSeconds: 0}
        scaleDown:
          stabilizationWindowSeconds: 300
          policies: [{type: Percent, value: 20, periodSeconds: 300}]
  triggers:
    - type: prometheus
      metricType: AverageValue
      metadata:
        serverAddress: http://prometheus-operated.monitoring.svc:9090
        query: sum(bisllm_in_flight_tokens)
        threshold: "50000"
"""
    )


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(document: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value

    return mutate


_DELETE = object()
HPA = "spec.advanced.horizontalPodAutoscalerConfig.behavior"
BROKEN_SCALEDOBJECTS = {
    "threshold-as-number": _set("spec.triggers.0.metadata.threshold", 50000),
    "threshold-not-numeric": _set("spec.triggers.0.metadata.threshold", "lots"),
    "missing-scaleTargetRef": _set("spec.scaleTargetRef", _DELETE),
    "scaleTargetRef-without-name": _set("spec.scaleTargetRef.name", _DELETE),
    "missing-metadata-name": _set("metadata.name", _DELETE),
    "wrong-apiVersion": _set("apiVersion", "keda.sh/v1"),
    "wrong-kind": _set("kind", "ScaledJob"),
    "unknown-spec-key": _set("spec.minReplicas", 1),
    "unknown-trigger-key": _set("spec.triggers.0.threshold", "50000"),
    "no-triggers": _set("spec.triggers", []),
    "trigger-without-type": _set("spec.triggers.0.type", _DELETE),
    "trigger-without-metadata": _set("spec.triggers.0.metadata", _DELETE),
    "prometheus-without-query": _set("spec.triggers.0.metadata.query", _DELETE),
    "bad-metricType": _set("spec.triggers.0.metricType", "Average"),
    "negative-maxReplicaCount": _set("spec.maxReplicaCount", -1),
    "replicas-as-string": _set("spec.minReplicaCount", "1"),
    "stabilization-over-an-hour": _set(f"{HPA}.scaleDown.stabilizationWindowSeconds", 7200),
    "policy-type-lowercase": _set(f"{HPA}.scaleDown.policies.0.type", "percent"),
    "policy-value-zero": _set(f"{HPA}.scaleDown.policies.0.value", 0),
    "policy-period-over-30-min": _set(f"{HPA}.scaleDown.policies.0.periodSeconds", 3600),
    "bad-selectPolicy": _set(f"{HPA}.scaleDown.selectPolicy", "Maximum"),
    "fallback-without-replicas": _set("spec.fallback", {"failureThreshold": 3}),
    "authenticationRef-without-name": _set("spec.triggers.0.authenticationRef", {"kind": "x"}),
}


def test_keda_schema_accepts_a_good_scaledobject() -> None:
    document = _sample_scaledobject()
    assert keda_errors(document) == []
    document["spec"]["fallback"] = {"failureThreshold": 3, "replicas": 2}
    document["spec"]["idleReplicaCount"] = 0
    document["spec"]["initialCooldownPeriod"] = 60
    document["spec"]["advanced"]["restoreToOriginalReplicaCount"] = True
    document["spec"]["advanced"]["scalingModifiers"] = {"formula": "a", "target": "2"}
    document["spec"]["triggers"][0]["authenticationRef"] = {
        "name": "prom-auth",
        "kind": "ClusterTriggerAuthentication",
    }
    document["spec"]["triggers"][0]["useCachedMetrics"] = True
    assert keda_errors(document) == []


@pytest.mark.parametrize("mutate", BROKEN_SCALEDOBJECTS.values(), ids=BROKEN_SCALEDOBJECTS.keys())
def test_keda_schema_rejects_broken_scaledobject(
    packaged: dict[str, Packaged], mutate: Callable[[dict[str, Any]], None]
) -> None:
    """Each break is applied to a ScaledObject that `bisllm package` rendered (and that passes)."""
    first = next(iter(packaged.values()))
    document = copy.deepcopy(only(k8s_documents(first.out), "ScaledObject"))
    assert keda_errors(document) == []
    mutate(document)
    assert keda_errors(document), "the schema accepted a broken ScaledObject"


def test_kubernetes_validate_is_strict(packaged: dict[str, Packaged]) -> None:
    """The built-in check bites: a typo and a wrong type in a Deployment are both rejected."""
    first = next(iter(packaged.values()))
    deployment = next(d for d in k8s_documents(first.out) if d["kind"] == "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "1"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


# --------------------------------------------------------------------------------------------
# 2b. multi-node engines (LeaderWorkerSet) and DP attention

LWS_API = "leaderworkerset.x-k8s.io/v1"
LEADER_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
RENDEZVOUS_PORT = 29500
# The LeaderWorkerSet fields this package may use (LWS v1's LeaderWorkerSetSpec and
# LeaderWorkerTemplate); the pod templates are checked as Kubernetes PodTemplates.
LWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": LWS_API},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {"type": "object"},
                "networkConfig": {"type": "object"},
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {
                            "enum": [
                                "Default",
                                "RecreateGroupOnPodRestart",
                                "RecreateGroupAfterStart",
                                "None",
                            ]
                        },
                        "subGroupPolicy": {"type": "object"},
                        "volumeClaimTemplates": {"type": "array"},
                        "persistentVolumeClaimRetentionPolicy": {"type": "object"},
                    },
                },
            },
        },
    },
}


def parallel_config(
    *,
    gpus: int,
    tp: int,
    nodes: int = 1,
    dp: int = 1,
    dp_attention: bool = False,
    model_name: str = "tiny-moe",
    extra: str = "",
) -> str:
    text = (
        SMALL_CONFIG.replace("model_name: tiny-moe", f"model_name: {model_name}")
        .replace("accelerator: H100:2", f"accelerator: H100:{gpus}\n  node_count: {nodes}")
        .replace("tensor_parallel_size: 2", f"tensor_parallel_size: {tp}")
    )
    text += f"llm_config:\n  data_parallel_size: {dp}\n"
    if dp_attention:
        text += f"  enable_attention_dp: true\n  expert_parallel_size: {tp}\n"
    return text + extra


def package_k8s(tmp_path: Path, text: str) -> tuple[list[dict[str, Any]], DeploymentSpec]:
    config = write_config(tmp_path / "cfg" / "config.yaml", text)
    validation = validate_file(config)
    assert validation.ok and validation.spec is not None, validation.report()
    result = package(config, "-o", tmp_path / "out", "--target", "k8s")
    assert result.exit_code == 0, result.output
    return k8s_documents(tmp_path / "out"), validation.spec


def lws_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(LWS_SCHEMA)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def validate_lws(lws: dict[str, Any]) -> None:
    assert lws_errors(lws) == []
    for key in ("leaderTemplate", "workerTemplate"):
        template = lws["spec"]["leaderWorkerTemplate"][key]
        kubernetes_validate.validate(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": key.lower()},
                "template": template,
            },
            KUBERNETES_VERSION,
            strict=True,
        )


def container(template: dict[str, Any]) -> dict[str, Any]:
    (only_container,) = template["spec"]["containers"]
    return only_container


def router_targets(documents: list[dict[str, Any]]) -> list[str]:
    (args,) = [
        container(d["spec"]["template"])["args"]
        for d in documents
        if d["kind"] == "Deployment" and role_of(d) == "router"
    ]
    return args[args.index("--workers") + 1].split(",")


def pod_labels(template: dict[str, Any], worker_index: int) -> dict[str, str]:
    """A pod's labels once LWS has added its own (the ones a Service can select on)."""
    return {**template["metadata"]["labels"], LEADER_LABEL: str(worker_index)}


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
MULTI_NODE = {
    # name: (GPUs per node, nodes, tensor parallel, data parallel) -> (group size, groups
    # per replica, GPUs per pod)
    "tp16-2-nodes": ((8, 2, 16, 1), (2, 1, 8)),
    "tp32-4-nodes": ((8, 4, 32, 1), (4, 1, 8)),
    "tp16-dp2-4-nodes": ((8, 4, 16, 2), (2, 2, 8)),
    "tp8-2-nodes-of-4": ((4, 2, 8, 1), (2, 1, 4)),
}


@pytest.mark.parametrize(("shape", "expected"), MULTI_NODE.values(), ids=MULTI_NODE.keys())
def test_multi_node_engine_is_a_leaderworkerset(
    tmp_path: Path, shape: tuple[int, int, int, int], expected: tuple[int, int, int]
) -> None:
    gpus, nodes, tp, dp = shape
    size, groups, pod_gpus = expected
    extra = (
        "secrets:\n  hf_access_token: null\n"
        "environment_variables:\n  NCCL_DEBUG: INFO\n"
        "autoscaling_settings:\n  min_replica: 2\n  max_replica: 5\n"
    )
    documents, spec = package_k8s(
        tmp_path, parallel_config(gpus=gpus, tp=tp, nodes=nodes, dp=dp, extra=extra)
    )
    assert Counter(d["kind"] for d in documents) == {
        "ConfigMap": 1,
        "Deployment": 1,  # the router
        "LeaderWorkerSet": 1,
        "Service": 2,
        "ScaledObject": 1,
    }
    for document in documents:
        if document["kind"] not in ("ScaledObject", "LeaderWorkerSet"):
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    lws = only(documents, "LeaderWorkerSet")
    validate_lws(lws)
    name = lws["metadata"]["name"]
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == size
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    assert lws["spec"]["replicas"] == 2 * groups  # min_replica engine groups per replica

    leader, worker = group["leaderTemplate"], group["workerTemplate"]
    expected_args = [
        "/etc/bisllm/config.yaml",
        "--role",
        "worker",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--nnodes",
        "$(LWS_GROUP_SIZE)",
        "--node-rank",
        "$(LWS_WORKER_INDEX)",
        "--master-addr",
        "$(LWS_LEADER_ADDRESS)",
        "--master-port",
        "29500",
    ]
    for template in (leader, worker):
        pod = container(template)
        assert pod["args"] == expected_args
        assert pod["resources"]["requests"]["nvidia.com/gpu"] == pod_gpus
        assert pod["resources"]["limits"]["nvidia.com/gpu"] == pod_gpus
        assert {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT} in pod["ports"]
        assert {"name": "NCCL_DEBUG", "value": "INFO"} in pod["env"]
        assert {"name": "BISLLM_SPEC", "value": "/etc/bisllm/spec.json"} in pod["env"]
        assert template["spec"]["nodeSelector"] == {"bisllm.dev/accelerator": "H100"}
        assert template["metadata"]["labels"] == lws["metadata"]["labels"]
        mounts = {m["name"]: m["mountPath"] for m in pod["volumeMounts"]}
        assert mounts == {
            "config": "/etc/bisllm",
            "models": "/models",
            "dshm": "/dev/shm",
            "secrets": "/secrets",
        }
    # Both templates are the same pod but for what serving HTTP adds.
    assert leader["spec"]["volumes"] == worker["spec"]["volumes"]
    assert (
        container(leader)["image"]
        == container(worker)["image"]
        == image_ref(spec, PackageOptions())
    )
    assert gpus * nodes == tp * dp == pod_gpus * size * groups

    # Only the leader serves HTTP: probes, the http port and the Prometheus scrape.
    for probe in PROBES:
        assert container(leader)[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert probe not in container(worker)
    assert {"name": "http", "containerPort": SERVER_PORT} in container(leader)["ports"]
    assert [p["name"] for p in container(worker)["ports"]] == ["rendezvous"]
    assert leader["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert "prometheus.io/scrape" not in worker["metadata"]["annotations"]

    # The router's Service is headless and selects the leaders only; it is not the one LWS
    # creates under the set's own name for the rendezvous addresses.
    (service,) = [
        d
        for d in documents
        if d["kind"] == "Service" and selects(d["spec"]["selector"], pod_labels(leader, 0))
    ]
    assert service["metadata"]["name"] != name
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], pod_labels(leader, 0))
    assert not selects(service["spec"]["selector"], pod_labels(worker, 1))
    assert [p["port"] for p in service["spec"]["ports"]] == [SERVER_PORT]
    assert router_targets(documents) == [f"{service['metadata']['name']}:{SERVER_PORT}"]

    # KEDA scales the set (its scale subresource counts groups).
    scaled = only(documents, "ScaledObject")
    assert keda_errors(scaled) == []
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": LWS_API,
        "kind": "LeaderWorkerSet",
        "name": name,
    }
    assert scaled["spec"]["minReplicaCount"] == 2 * groups
    assert scaled["spec"]["maxReplicaCount"] == 5 * groups
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert query.startswith('sum(avg_over_time(bisllm_in_flight_tokens{model_name="tiny-moe"}')


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-nodes"])
def test_dp_attention_serves_every_rank(tmp_path: Path, nodes: int) -> None:
    """Every rank of a DP-attention engine is its own target: port 8000 + its local rank."""
    tp = 8 * nodes
    documents, _ = package_k8s(
        tmp_path, parallel_config(gpus=8, tp=tp, nodes=nodes, dp_attention=True)
    )
    ports = list(range(8000, 8008))
    names = ["http", *(f"http-{i}" for i in range(1, 8))]
    if nodes == 1:
        assert not [d for d in documents if d["kind"] == "LeaderWorkerSet"]
        workers = next(
            d
            for d in documents
            if d["kind"] == "Deployment"
            and "--no-router" in container(d["spec"]["template"])["args"]
        )
        templates = {"pod": workers["spec"]["template"]}
        target_kind = ("apps/v1", "Deployment")
    else:
        lws = only(documents, "LeaderWorkerSet")
        validate_lws(lws)
        workers = lws
        group = lws["spec"]["leaderWorkerTemplate"]
        templates = {"leader": group["leaderTemplate"], "worker": group["workerTemplate"]}
        target_kind = (LWS_API, "LeaderWorkerSet")
    for template in templates.values():
        pod = container(template)
        assert pod["args"][-1] == "--no-router"
        assert pod["args"].count("--no-router") == 1
        http = [p for p in pod["ports"] if p["name"] != "rendezvous"]
        assert [p["containerPort"] for p in http] == ports
        assert [p["name"] for p in http] == names
        # Every pod serves HTTP, so every pod has the probes (on 8000) and is scraped.
        for probe in PROBES:
            assert pod[probe]["httpGet"]["port"] == "http"
        assert template["metadata"]["annotations"]["prometheus.io/port"] == "8000"
        # One scrape per pod must count every rank: the first rank's node-wide page.
        assert template["metadata"]["annotations"]["prometheus.io/path"] == "/metrics/node"
        assert pod["resources"]["limits"]["nvidia.com/gpu"] == 8
    services = [
        d
        for d in documents
        if d["kind"] == "Service"
        and selects(d["spec"]["selector"], pod_labels(next(iter(templates.values())), 0))
    ]
    (service,) = services
    assert service["spec"]["clusterIP"] == "None"
    for template in templates.values():  # the leader and the other nodes alike
        for index in range(nodes):
            assert selects(service["spec"]["selector"], pod_labels(template, index))
    assert [p["port"] for p in service["spec"]["ports"]] == ports
    assert [p["targetPort"] for p in service["spec"]["ports"]] == names
    service_name = service["metadata"]["name"]
    assert router_targets(documents) == [f"{service_name}:{port}" for port in ports]
    target = only(documents, "ScaledObject")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        *target_kind,
        workers["metadata"]["name"],
    )


def test_single_node_without_dp_attention_is_unchanged(tmp_path: Path) -> None:
    """The one-node form without DP attention is exactly what it was before multi-node
    engines: a Deployment, one port, no rendezvous, no LWS arguments."""
    documents, spec = package_k8s(tmp_path, SMALL_CONFIG + "secrets:\n  hf_access_token: null\n")
    assert Counter(d["kind"] for d in documents) == {
        "ConfigMap": 1,
        "Deployment": 2,
        "Service": 2,
        "ScaledObject": 1,
    }
    workers = next(
        d
        for d in documents
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tiny-moe-worker"
    )
    labels = {
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "bisllm",
        "app.kubernetes.io/name": "tiny-moe",
    }
    selector = {k: v for k, v in labels.items() if k != "app.kubernetes.io/managed-by"}
    health = {"path": "/health", "port": "http"}
    assert workers == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tiny-moe-worker", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": "8000",
                        "prometheus.io/path": "/metrics",
                        "bisllm.dev/config-sha256": spec.source_config_sha256,
                    },
                },
                "spec": {
                    "nodeSelector": {"bisllm.dev/accelerator": "H100"},
                    "terminationGracePeriodSeconds": 120,
                    "containers": [
                        {
                            "name": "worker",
                            "image": image_ref(spec, PackageOptions()),
                            "args": [
                                "/etc/bisllm/config.yaml",
                                "--role",
                                "worker",
                                "--host",
                                "0.0.0.0",
                                "--port",
                                "8000",
                            ],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "env": [{"name": "BISLLM_SPEC", "value": "/etc/bisllm/spec.json"}],
                            "resources": {
                                "requests": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": 2},
                                "limits": {"nvidia.com/gpu": 2},
                            },
                            "startupProbe": {
                                "httpGet": health,
                                "periodSeconds": 10,
                                "failureThreshold": 360,
                            },
                            "readinessProbe": {"httpGet": health, "periodSeconds": 5},
                            "livenessProbe": {
                                "httpGet": health,
                                "periodSeconds": 15,
                                "failureThreshold": 4,
                            },
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/etc/bisllm", "readOnly": True},
                                {"name": "models", "mountPath": "/models"},
                                {"name": "dshm", "mountPath": "/dev/shm"},
                                {"name": "secrets", "mountPath": "/secrets", "readOnly": True},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "tiny-moe-config"}},
                        {"name": "models", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                        {
                            "name": "secrets",
                            "secret": {"secretName": "tiny-moe-secrets", "optional": True},
                        },
                    ],
                },
            },
        },
    }
    service = next(
        d
        for d in documents
        if d["kind"] == "Service" and d["metadata"]["name"] == "tiny-moe-worker"
    )
    assert service == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "tiny-moe-worker", "labels": labels},
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [{"name": "http", "port": 8000, "targetPort": "http"}],
        },
    }
    assert router_targets(documents) == ["tiny-moe-worker:8000"]
    assert only(documents, "ScaledObject")["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tiny-moe-worker",
    }


def test_multi_node_names_fit_the_statefulsets(tmp_path: Path) -> None:
    """LWS names its StatefulSets NAME and NAME-<group>; their pods' controller-revision-hash
    label (<statefulset>-<10 characters>) must stay within 63 characters."""
    documents, _ = package_k8s(
        tmp_path, parallel_config(gpus=8, tp=16, nodes=2, model_name="m" * 60)
    )
    name = only(documents, "LeaderWorkerSet")["metadata"]["name"]
    assert len(f"{name}-999-0123456789") <= 63
    assert router_targets(documents)[0].startswith(name)


MULTI_NODE_REFUSED = {
    "data-parallel-per-node": (
        parallel_config(gpus=8, tp=8, nodes=2, dp=2),
        ["data_parallel_size 2", "node_count 2", "node_count: 1"],
    ),
}


def test_multi_node_disaggregated_pools_are_leader_worker_sets(tmp_path: Path) -> None:
    """Prefill and decode workers spanning two nodes each: one LeaderWorkerSet per pool, its
    pods started in their role with the rendezvous arguments, the router listing both pools'
    leaders, and each pool's KEDA query selecting its own set's pods."""
    documents, _ = package_k8s(
        tmp_path,
        parallel_config(gpus=8, tp=16, nodes=2)
        + "  is_disaggregated: true\n  b10_disagg_config:\n"
        + "    prefill_workers_per_replica: 1\n    decode_workers_per_replica: 2\n",
    )
    sets = {d["metadata"]["name"]: d for d in documents if d["kind"] == "LeaderWorkerSet"}
    assert len(sets) == 2
    roles = {}
    for name, lws in sets.items():
        validate_lws(lws)
        group = lws["spec"]["leaderWorkerTemplate"]
        assert group["size"] == 2
        args = container(group["leaderTemplate"])["args"]
        role = args[args.index("--role") + 1]
        roles[role] = name
        assert container(group["workerTemplate"])["args"] == args
        assert "--node-rank" in args and "--no-router" not in args
    assert set(roles) == {"prefill", "decode"}
    assert [t.split(":")[0] for t in router_targets(documents)] == [
        f"{roles['prefill']}-http",
        f"{roles['decode']}-http",
    ]
    scaled = {
        d["spec"]["scaleTargetRef"]["name"]: d for d in documents if d["kind"] == "ScaledObject"
    }
    assert set(scaled) == set(roles.values())
    for name, scaler in scaled.items():
        assert scaler["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
        query = scaler["spec"]["triggers"][0]["metadata"]["query"]
        pods = re.search(r'pod=~"([^"]+)"', query).group(1)
        assert re.fullmatch(pods, f"{name}-0") and re.fullmatch(pods, f"{name}-3-1")
        other = next(n for n in roles.values() if n != name)
        assert not re.fullmatch(pods, f"{other}-0")
    assert (
        scaled[roles["decode"]]["spec"]["minReplicaCount"]
        == 2 * scaled[roles["prefill"]]["spec"]["minReplicaCount"]
    )


@pytest.mark.parametrize(
    ("text", "needles"), MULTI_NODE_REFUSED.values(), ids=MULTI_NODE_REFUSED.keys()
)
def test_multi_node_without_a_manifest_is_refused(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml", text)
    assert validate_file(config).ok, validate_file(config).report()
    before = snapshot([tmp_path])
    result = package(config, "-o", tmp_path / "out", "--target", "k8s")
    assert_refused(result, before, [tmp_path], *needles)


# --------------------------------------------------------------------------------------------
# 3. determinism


def test_package_is_deterministic(pkg: Packaged) -> None:
    """The in-process and the subprocess run (another hash seed) give byte-identical trees."""
    assert pkg.result.exit_code == 0 and pkg.again_run.returncode == 0
    first, second = tree(pkg.out), tree(pkg.again)
    assert sorted(first) == sorted(second)
    different = [name for name in first if first[name] != second[name]]
    assert different == []


def test_crlf_config_is_carried_verbatim(tmp_path: Path) -> None:
    """The config travels byte for byte and its recorded hash is the file's own sha256."""
    config = tmp_path / "cfg" / "config.yaml"
    config.parent.mkdir()
    config.write_bytes(SMALL_CONFIG.replace("\n", "\r\n").encode("utf-8"))
    result = package(config, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    source = config.read_bytes()
    truss_config = yaml.safe_load((tmp_path / "out" / "truss" / "config.yaml").read_text())
    assert truss_config["model_metadata"]["bisllm"]["source_config_sha256"] == (
        hashlib.sha256(source).hexdigest()
    )
    assert (tmp_path / "out" / "truss" / "data" / "bisllm" / "config.yaml").read_bytes() == source


# --------------------------------------------------------------------------------------------
# 4. refusals write nothing


def assert_refused(
    result: Result, watched_before: dict[str, Any], watched: list[Path], *needles: str
) -> None:
    assert result.exit_code == 1, f"exit {result.exit_code}: {result.output}"
    assert "Packaged" not in result.stdout
    stderr = result.stderr
    assert stderr.strip(), "no error message on stderr"
    for needle in needles:
        assert needle.lower() in stderr.lower(), f"{needle!r} not in {stderr!r}"
    assert snapshot(watched) == watched_before, "a refused package wrote or removed something"


INVALID_CONFIGS = {
    "malformed-yaml": (
        "model_name: tiny-moe\nresources: [H100:2\n",
        ["invalid YAML", "config.yaml:"],
    ),
    "wrong-types": (
        SMALL_CONFIG.replace("tensor_parallel_size: 2", "tensor_parallel_size: two"),
        ["trt_llm.runtime.tensor_parallel_size", "config.yaml:12:"],
    ),
    "unknown-key": (
        SMALL_CONFIG.replace("    tensor_parallel_size: 2", "    tensor_parallel_sise: 2"),
        ["unknown key 'tensor_parallel_sise'", "did you mean 'tensor_parallel_size'"],
    ),
    "unknown-top-level-key": (
        SMALL_CONFIG + "bisllm:\n  engine: fast\n",
        ["unknown key 'bisllm'"],
    ),
}


@pytest.mark.parametrize(("text", "needles"), INVALID_CONFIGS.values(), ids=INVALID_CONFIGS.keys())
def test_invalid_config_is_refused(tmp_path: Path, text: str, needles: list[str]) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml", text)
    before = snapshot([tmp_path])
    result = package(config, "-o", tmp_path / "out")
    assert_refused(result, before, [tmp_path], *needles)


def test_output_is_an_existing_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    (tmp_path / "out.txt").write_text("keep me\n")
    before = snapshot([tmp_path])
    result = package(config, "-o", tmp_path / "out.txt")
    assert_refused(result, before, [tmp_path], "is a file")


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_output_is_a_foreign_non_empty_dir(tmp_path: Path, force: bool) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    before = snapshot([tmp_path])
    result = package(config, "-o", tmp_path / "out", *(["--force"] if force else []))
    needle = MARKER if force else "--force"
    assert_refused(result, before, [tmp_path], "not empty" if not force else "did not", needle)


def test_output_is_an_earlier_package_without_force(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    assert package(config, "-o", tmp_path / "out").exit_code == 0
    before = snapshot([tmp_path])
    result = package(config, "-o", tmp_path / "out")
    assert_refused(result, before, [tmp_path], "--force")


@pytest.mark.parametrize("where", ["config-dir", "ancestor-of-config"])
def test_output_would_hold_the_config(tmp_path: Path, where: str) -> None:
    """Refused even with --force and a marker present, so only the config check stands between."""
    config = write_config(tmp_path / "ws" / "proj" / "config.yaml")
    for directory in (tmp_path / "ws", tmp_path / "ws" / "proj"):
        (directory / MARKER).write_text("bisllm-truss 0.0.0\n")
    out = config.parent if where == "config-dir" else config.parent.parent
    before = snapshot([tmp_path])
    result = package(config, "-o", out, "--force")
    assert_refused(result, before, [tmp_path], "config")
    assert config.read_text(encoding="utf-8") == SMALL_CONFIG


def test_output_is_filesystem_root(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    watched = [Path("/"), tmp_path]
    before = snapshot(watched)
    result = package(config, "-o", "/", "--force")
    assert_refused(result, before, watched, "refusing", "dedicated directory")


@pytest.mark.parametrize("spelling", [".", "absolute"])
def test_output_is_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    """Even an empty working directory is refused: `-o .` is almost always a slip."""
    config = write_config(tmp_path / "cfg" / "config.yaml")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    before = snapshot([tmp_path])
    result = package(config, "-o", "." if spelling == "." else here)
    assert_refused(result, before, [tmp_path], "refusing", "dedicated directory")


def test_output_is_the_home_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    home = tmp_path / "home"
    home.mkdir()
    before = snapshot([tmp_path])
    result = package(config, "-o", home, env={"HOME": str(home)})
    assert_refused(result, before, [tmp_path], "refusing", "dedicated directory")


def test_output_parent_missing(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    before = snapshot([tmp_path])
    result = package(config, "-o", tmp_path / "missing" / "out")
    assert_refused(result, before, [tmp_path], "does not exist")


@pytest.mark.parametrize("target", ["bogus", "truss,bogus", ","])
def test_unknown_target(tmp_path: Path, target: str) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    before = snapshot([tmp_path])
    result = package(config, "-o", tmp_path / "out", "--target", target)
    assert_refused(result, before, [tmp_path], repr(target), "truss, docker, k8s")


def test_empty_existing_dir_needs_no_force(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    (tmp_path / "out").mkdir()
    result = package(config, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / MARKER).is_file()


def test_force_replaces_an_earlier_package(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    out = tmp_path / "area" / "out"
    out.parent.mkdir()
    assert package(config, "-o", out).exit_code == 0
    assert (out / "k8s").is_dir() and (out / "docker").is_dir()
    (out / "truss" / "stale.txt").write_text("from an older version\n")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("left behind\n")

    result = package(config, "-o", out, "--force", "--target", "truss")
    assert result.exit_code == 0, result.output
    fresh = tmp_path / "fresh"
    assert package(config, "-o", fresh, "--target", "truss").exit_code == 0
    assert tree(out) == tree(fresh), "--force must leave exactly a fresh package"
    assert not (out / "k8s").exists() and not (out / "docker").exists()
    assert sorted(os.listdir(out.parent)) == ["out"], "staging or retired trees were left behind"


# --------------------------------------------------------------------------------------------
# 5. bisllm push


@pytest.fixture
def push_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """An environment with no truss, no credentials and a private scratch dir for temp files."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "empty-bin").mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return {
        "PATH": str(tmp_path / "empty-bin"),
        "HOME": str(home),
        "USER_TRUSSRC_PATH": str(home / ".trussrc"),
        "BASETEN_TRUSS_AUTH_API_KEY": None,
        "BASETEN_TRUSS_AUTH_REMOTE_URL": None,
    }


def fake_truss(directory: Path, exit_code: int) -> Path:
    """A `truss` that records its arguments and the config it was handed, then exits."""
    directory.mkdir()
    script = directory / "truss"
    script.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > '{directory}/argv'\n"
        f"cp \"$2/config.yaml\" '{directory}/pushed-config.yaml'\n"
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return directory


def write_trussrc(path: Path) -> None:
    path.write_text(
        "[baseten]\nremote_provider = baseten\napi_key = test-key\n"
        "remote_url = https://app.baseten.co\n"
    )


def push(*args: str | Path, env: dict[str, str | None]) -> Result:
    return RUNNER.invoke(main, ["push", *map(str, args)], env=env)


def test_push_without_truss(tmp_path: Path, push_env: dict[str, str | None]) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    write_trussrc(tmp_path / "home" / ".trussrc")
    result = push(config, env=push_env)
    assert result.exit_code == 1, result.output
    assert "truss is not installed" in result.stderr
    assert "pip install" in result.stderr
    assert os.listdir(tmp_path / "scratch") == []


def test_push_without_credentials(tmp_path: Path, push_env: dict[str, str | None]) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    env = {**push_env, "PATH": os.pathsep.join([str(SCRIPTS), "/usr/bin", "/bin"])}
    result = push(config, env=env)
    assert result.exit_code == 1, result.output
    assert "no Baseten credentials" in result.stderr
    assert "truss login" in result.stderr
    assert os.listdir(tmp_path / "scratch") == []


@pytest.mark.parametrize("credentials", ["trussrc", "environment"])
def test_push_runs_truss_push(
    tmp_path: Path, push_env: dict[str, str | None], credentials: str
) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    bin_dir = fake_truss(tmp_path / "bin", 0)
    env = {**push_env, "PATH": os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])}
    if credentials == "trussrc":
        write_trussrc(tmp_path / "home" / ".trussrc")
    else:
        env["BASETEN_TRUSS_AUTH_API_KEY"] = "test-key"
        env["BASETEN_TRUSS_AUTH_REMOTE_URL"] = "https://app.baseten.co"
    out = tmp_path / "pushed"
    extra = ["--publish", "--remote", "baseten", "--deployment-name", "canary"]
    result = push(config, "-o", out, *extra, env=env)
    assert result.exit_code == 0, result.output
    argv = (bin_dir / "argv").read_text().splitlines()
    assert argv == ["push", str(out.resolve() / "truss"), *extra]
    assert (bin_dir / "pushed-config.yaml").read_bytes() == (
        out / "truss" / "config.yaml"
    ).read_bytes()
    assert not (out / "k8s").exists(), "push packages only the truss target"


def test_push_into_temporary_dir(tmp_path: Path, push_env: dict[str, str | None]) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    bin_dir = fake_truss(tmp_path / "bin", 0)
    write_trussrc(tmp_path / "home" / ".trussrc")
    env = {**push_env, "PATH": os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])}
    result = push(config, env=env)
    assert result.exit_code == 0, result.output
    command, truss_dir = (bin_dir / "argv").read_text().splitlines()
    assert command == "push"
    assert Path(truss_dir).name == "truss"
    assert Path(truss_dir).is_relative_to((tmp_path / "scratch").resolve())
    pushed = yaml.safe_load((bin_dir / "pushed-config.yaml").read_text())
    assert pushed["model_name"] == "tiny-moe"
    assert os.listdir(tmp_path / "scratch") == [], "the temporary package was not cleaned up"


def test_push_reports_truss_failure(tmp_path: Path, push_env: dict[str, str | None]) -> None:
    config = write_config(tmp_path / "cfg" / "config.yaml")
    bin_dir = fake_truss(tmp_path / "bin", 3)
    write_trussrc(tmp_path / "home" / ".trussrc")
    env = {**push_env, "PATH": os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])}
    result = push(config, "--publish", env=env)
    assert result.exit_code == 1, result.output
    assert "status 3" in result.stderr
    assert (bin_dir / "argv").read_text().splitlines()[2:] == ["--publish"]
    assert os.listdir(tmp_path / "scratch") == []


# --------------------------------------------------------------------------------------------
# the ScaledObject scales down like `bisllm serve --autoscale`


class EmulatedHPA:
    """The HPA's scale-down rules for one `behavior.scaleDown` block, evaluated at each sync
    (k8s docs): the recommendation is the highest of the stabilisation window; each policy
    limits the drop relative to the replicas at the start of its period (Percent: keep
    ceil(n·(1 - p/100)); Pods: n - v); with selectPolicy Max the most permissive limit wins."""

    def __init__(self, down: dict[str, Any], replicas: int) -> None:
        assert down.get("selectPolicy", "Max") == "Max"
        self.down = down
        self.replicas = replicas
        self.changes: list[tuple[float, int]] = []  # (time, replicas removed)

    def sync(self, now: float, recommendation: int) -> int:
        limits = []
        for policy in self.down["policies"]:
            since = now - policy["periodSeconds"]
            start = self.replicas + sum(n for t, n in self.changes if t > since)
            if policy["type"] == "Percent":
                limits.append(math.ceil(start * (1 - policy["value"] / 100)))
            else:
                limits.append(start - policy["value"])
        target = max(recommendation, min(limits))
        if target < self.replicas:
            self.changes.append((now, self.replicas - target))
            self.replicas = target
        return self.replicas


def _packaged_scale_down(tmp_path: Path, extra: str) -> tuple[dict[str, Any], DeploymentSpec]:
    text = (
        SMALL_CONFIG
        + "autoscaling_settings:\n  min_replica: 1\n  max_replica: 40\n  scale_down_delay: 300\n"
        + extra
    )
    config = write_config(tmp_path / "config.yaml", text)
    out = tmp_path / "out"
    result = package(config, "-o", out, "--target", "k8s")
    assert result.exit_code == 0, result.output
    scaled = only(k8s_documents(out), "ScaledObject")
    assert keda_errors(scaled) == []
    spec = validate_file(config).spec
    assert spec is not None
    down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] == spec.autoscaling.scale_down_delay
    return down, spec


def _idle_local_policy(spec: DeploymentSpec, replicas: int):  # type: ignore[no-untyped-def]
    from bisllm_server.autoscaler.policy import Autoscaler, AutoscalerSettings, LoadSample

    scaler = Autoscaler(AutoscalerSettings.from_spec(spec.autoscaling, window_s=1.0), replicas)

    def at(now: float) -> int:
        scaler.observe(LoadSample(now, 0, 0, scaler.current))
        return scaler.decide(now).rounded_desired_scale

    return at


@pytest.mark.parametrize("rate", [20, 50, 33])
def test_keda_rate_scale_down_matches_the_local_policy(tmp_path: Path, rate: float) -> None:
    """Idle from n replicas: the HPA's first step down and the local policy's are the same
    (whole percents: the HPA takes no fraction, so a fractional rate is rounded up for it)."""
    down, spec = _packaged_scale_down(tmp_path, f"  max_scale_down_rate: {rate}\n")
    for replicas in range(2, 41):
        local = _idle_local_policy(spec, replicas)
        local(0.0)
        hpa = EmulatedHPA(down, replicas)
        assert local(300.0) == hpa.sync(300.0, 1), f"from {replicas} replicas"


def test_keda_half_life_scale_down_tracks_the_local_decay(tmp_path: Path) -> None:
    """The HPA cannot decay exponentially; its percent-per-period plus one replica per
    half-life stays within a replica or 20% of the local curve, and both halve in about one
    half-life."""
    half_life = 900
    down, spec = _packaged_scale_down(
        tmp_path,
        f"llm_config:\n  b10_autoscaling_config:\n    scale_down_half_life_seconds: {half_life}\n",
    )
    local = _idle_local_policy(spec, 16)
    hpa = EmulatedHPA(down, 16)
    halved: dict[str, float] = {}
    for step in range(0, 4 * 3600 // 15):
        now = step * 15.0  # the HPA's sync period
        counts = {"local": local(now), "hpa": hpa.sync(now, 1) if now else 16}
        for name, count in counts.items():
            if count <= 8:
                halved.setdefault(name, now)
        gap = abs(counts["local"] - counts["hpa"])
        assert gap <= max(1, 0.2 * counts["local"]), f"at {now} s: {counts}"
    assert counts == {"local": 1, "hpa": 1}
    for name, when in halved.items():
        assert half_life - 300 <= when <= half_life + 600, f"{name} halved at {when} s"
