"""`make demo`'s main job: start `bisllm serve --workers 2` on the embedded default model (two
engine worker processes behind the KV-aware router), talk to it with the official OpenAI SDK
(a chat answer, a tool call, a streamed completion, then requests sharing a long system prompt,
which the router keeps on the worker that has it cached), then stop it.

Run from the repository root: `.venv/bin/python examples/serve_demo.py [--port 8000] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

GCD_TOOL = {
    "type": "function",
    "function": {
        "name": "gcd",
        "description": "Greatest common divisor of two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"bisllm serve exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    sys.exit("bisllm serve did not become healthy in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    bisllm = Path(sys.executable).parent / "bisllm"
    command = [str(bisllm), "serve", "--port", str(args.port), "--log-level", "warning"]
    command += ["--workers", str(args.workers)]
    print("$", " ".join(["bisllm", *command[1:]]), flush=True)
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(url, server)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-required")

        print("\n# chat", flush=True)
        answer = client.chat.completions.create(
            model="not-required",
            messages=[{"role": "user", "content": "What does `json.dumps` do?"}],
            temperature=0,
            max_tokens=64,
        )
        print(answer.choices[0].message.content)
        print("usage:", answer.usage.model_dump(exclude_none=True))

        print("\n# tool call", flush=True)
        call = client.chat.completions.create(
            model="not-required",
            messages=[
                {"role": "user", "content": "What is the greatest common divisor of 84 and 36?"}
            ],
            tools=[GCD_TOOL],
            temperature=0,
            max_tokens=48,
        )
        for tool_call in call.choices[0].message.tool_calls or []:
            print(tool_call.function.name, json.loads(tool_call.function.arguments))
        print("finish_reason:", call.choices[0].finish_reason)

        print("\n# streamed completion", flush=True)
        prompt = (
            'def is_palindrome(text):\n    """Return True if text reads the same backwards."""\n'
        )
        print(prompt, end="")
        for chunk in client.completions.create(
            model="not-required", prompt=prompt, temperature=0, max_tokens=48, stream=True
        ):
            print(chunk.choices[0].text, end="", flush=True)
        print()

        print("\n# KV-aware routing: one system prompt, four questions", flush=True)
        system = (
            "You answer questions about the Python standard library. Be brief and exact. "
            "Quote the function signature first, then say what it returns and what it raises."
        )
        for module in ("json", "os.path", "itertools", "functools"):
            raw = client.chat.completions.with_raw_response.create(
                model="not-required",
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"What is in `{module}`?"},
                ],
                temperature=0,
                max_tokens=8,
            )
            usage = raw.parse().usage
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            print(
                f"{module:10} -> worker {raw.headers['x-bisllm-worker']} "
                f"({raw.headers['x-bisllm-route-reason']}), "
                f"{cached} of {usage.prompt_tokens} prompt tokens from cache"
            )
        # The workers report what hit their cache in a load line every 0.5 s: wait until their
        # counts cover every prompt the router sent (or 5 s) before comparing.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            router_stats = httpx.get(f"{url}/router/stats").json()
            totals = router_stats["totals"]
            if totals["worker_prompt_tokens"] >= totals["prompt_tokens"]:
                break
            time.sleep(0.1)
        stats = router_stats["rates"]
        print(
            f"router, all requests so far: best possible hit rate "
            f"{stats['kv_cache_best_prefix_hit_rate']:.2f}, its choices "
            f"{stats['kv_cache_estimated_hit_rate']:.2f}, workers report "
            f"{stats['kv_cache_hit_rate']:.2f} (kv_cache_* on /metrics)"
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
