"""`bisllm serve`: the entrypoint every package names, and the console script end to end."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from click.testing import CliRunner
from server_fixtures import GCD_QUESTION, GCD_TOOL

from bisllm_truss.cli import main
from bisllm_truss.cli_serve import serve

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "qwen3-30b-a3b-h100.yaml"
IMAGE_CONFIG_PATHS = ("/app/data/bisllm/config.yaml", "/etc/bisllm/config.yaml")


def _packaged_invocations(out: Path) -> dict[str, list[str]]:
    """The argument lists after `bisllm serve` that each packaging target runs."""
    result = CliRunner().invoke(main, ["package", str(EXAMPLE), "-o", str(out)])
    assert result.exit_code == 0, result.output
    truss = yaml.safe_load((out / "truss" / "config.yaml").read_text())
    start = shlex.split(truss["docker_server"]["start_command"])
    assert start[:2] == ["bisllm", "serve"]
    dockerfile = (out / "docker" / "Dockerfile").read_text().splitlines()
    entrypoint = next(
        yaml.safe_load(line[len("ENTRYPOINT") :])
        for line in dockerfile
        if line.startswith("ENTRYPOINT")
    )
    cmd = next(yaml.safe_load(line[len("CMD") :]) for line in dockerfile if line.startswith("CMD"))
    assert entrypoint == ["bisllm", "serve"]
    invocations = {"truss": start[2:], "docker": cmd}
    for name in ("workers", "router"):
        for doc in yaml.safe_load_all((out / "k8s" / f"{name}.yaml").read_text()):
            if doc and doc.get("kind") == "Deployment":
                container = doc["spec"]["template"]["spec"]["containers"][0]
                # No command: the image's ENTRYPOINT (bisllm serve) runs with these args.
                assert "command" not in container
                invocations[name] = container["args"]
    return invocations


def test_every_packaged_invocation_is_accepted(tmp_path: Path) -> None:
    invocations = _packaged_invocations(tmp_path / "pkg")
    assert set(invocations) == {"truss", "docker", "workers", "router"}
    for name, args in invocations.items():
        # The config lives at an image path here; the local example stands in for it.
        args = [str(EXAMPLE) if a in IMAGE_CONFIG_PATHS else a for a in args]
        context = serve.make_context("serve", list(args))
        params = context.params
        assert params["config"] == EXAMPLE and params["port"] == 8000, name
        assert params["host"] == "0.0.0.0", name
        assert params["role"] == ("router" if name == "router" else "worker"), name
        if name == "router":
            assert params["workers"].endswith(":8000")
            assert params["router_snapshot"] is not None  # kept across container restarts


def test_router_role_needs_worker_addresses() -> None:
    result = CliRunner().invoke(main, ["serve", str(EXAMPLE), "--role", "router"])
    assert result.exit_code == 2 and "--role router needs --workers HOST:PORT" in result.stderr
    result = CliRunner().invoke(
        main, ["serve", str(EXAMPLE), "--role", "router", "--workers", "w:8000,nonsense"]
    )
    assert result.exit_code == 2 and "'nonsense' is not HOST:PORT" in result.stderr


def test_local_workers_are_a_count() -> None:
    for bad in ("w:8000", "1..x", "..2"):
        result = CliRunner().invoke(main, ["serve", str(EXAMPLE), "--workers", bad])
        assert result.exit_code == 2
        assert "--workers: expected a number of local workers" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "need 1 <= MIN <= MAX"),
        (["--workers", "3..2", "--autoscale"], "need 1 <= MIN <= MAX"),
        (["--workers", "0..2", "--autoscale"], "never scales to zero"),
        (["--workers", "1..3"], "--workers 1..3: a range needs --autoscale"),
        (["--workers", "2", "--autoscale"], "--autoscale needs --workers MIN..MAX"),
        (["--role", "router", "--workers", "w:8000", "--autoscale"], "KEDA ScaledObject"),
    ],
)
def test_autoscale_options_are_checked(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", str(EXAMPLE), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_missing_weights_name_where_they_were_looked_for() -> None:
    result = CliRunner().invoke(main, ["serve", str(EXAMPLE)])
    assert result.exit_code == 1
    assert "/models/checkpoint" in result.stderr and "bisllm hydrate" in result.stderr


def test_invalid_config_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: x\nresourcs: {}\n")
    result = CliRunner().invoke(main, ["serve", str(bad)])
    assert result.exit_code == 1 and "resourcs" in result.stderr and ": 2 errors" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_console_script_serves_the_embedded_model() -> None:
    """`bisllm serve` with no config: the embedded default model, on a real port."""
    port = _free_port()
    bisllm = Path(sys.executable).parent / "bisllm"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [str(bisllm), "serve", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # Startup loads the model (and may build the CPU kernels): wait for /health.
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(
            model="not-required",
            messages=[{"role": "user", "content": GCD_QUESTION}],
            tools=[GCD_TOOL],
            temperature=0,
            max_tokens=48,
        )
        assert out.model == "bisllm-tiny-moe"
        assert out.choices[0].message.tool_calls[0].function.name == "gcd"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("server did not stop on SIGINT")
    assert process.returncode == 0


DISAGGREGATED = REPO / "examples" / "qwen3-coder-480b-a35b.yaml"  # a 1P:2D replication unit


def test_disaggregated_packages_run_prefill_and_decode_workers(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    result = CliRunner().invoke(main, ["package", str(DISAGGREGATED), "-o", str(out)])
    assert result.exit_code == 0, result.output
    roles, router = [], None
    for name in ("workers", "router"):
        for doc in yaml.safe_load_all((out / "k8s" / f"{name}.yaml").read_text()):
            if not doc or doc.get("kind") != "Deployment":
                continue
            args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
            args = [str(DISAGGREGATED) if a in IMAGE_CONFIG_PATHS else a for a in args]
            params = serve.make_context("serve", list(args)).params
            if name == "router":
                router = params
            else:
                roles.append(params["role"])
    assert roles == ["prefill", "decode"]
    assert router is not None and router["role"] == "router"
    assert [w.rsplit(":", 1)[1] for w in router["workers"].split(",")] == ["8000", "8000"]


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        (EXAMPLE, ["--disaggregated"], "does not enable disaggregation; set"),
        (DISAGGREGATED, ["--disaggregated", "--workers", "2"], "it takes no --role or --workers"),
        (DISAGGREGATED, ["--disaggregated", "--role", "prefill"], "no --role or --workers"),
    ],
)
def test_disaggregated_options_are_checked(config: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", str(config), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
