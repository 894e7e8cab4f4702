"""The OpenAI-compatible server, driven by the official `openai` SDK (sync and async,
streaming and not) over real HTTP, serving the embedded default model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from server_fixtures import GCD_QUESTION, GCD_TOOL, RunningServer, second_front, tiny_server

from bisllm_server.openai.serving import ServerSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JSON_SYSTEM = "Answer with a single JSON object and nothing else."
CODE_PROMPT = 'def is_palindrome(text):\n    """Return True if text reads the same backwards."""\n'


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with tiny_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def async_client(server: RunningServer) -> openai.AsyncOpenAI:
    """A fresh async client per event loop: its connection pool belongs to the loop."""
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def user(text: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}]


# -- basics ----------------------------------------------------------------------------------


def test_chat_completion_answers_and_reports_usage(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="not-required",  # any name is accepted, as BIS-LLM does
        messages=user("What does `json.dumps` do?"),
        temperature=0,
        max_tokens=48,
    )
    assert out.object == "chat.completion" and out.model == "bisllm-tiny-moe"
    choice = out.choices[0]
    assert choice.message.role == "assistant" and "json" in choice.message.content.lower()
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 5 and 0 < out.usage.completion_tokens <= 48
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_chat_adds_up_to_the_same_answer(client: openai.OpenAI) -> None:
    kwargs = dict(messages=user("What does `json.dumps` do?"), temperature=0, max_tokens=40)
    full = client.chat.completions.create(model="m", **kwargs)
    chunks = list(
        client.chat.completions.create(
            model="m", stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [full.choices[0].finish_reason]
    # include_usage: one last chunk with no choices and the totals; others carry none.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_streams_and_completes(server: RunningServer) -> None:
    async def run() -> tuple[str, str]:
        aclient = async_client(server)
        whole = await aclient.completions.create(
            model="m", prompt=CODE_PROMPT, temperature=0, max_tokens=24
        )
        parts = []
        async for chunk in await aclient.completions.create(
            model="m", prompt=CODE_PROMPT, temperature=0, max_tokens=24, stream=True
        ):
            parts.append(chunk.choices[0].text)
        return whole.choices[0].text, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert whole == streamed and "return" in whole


def test_completion_of_the_model_card_prompt(client: openai.OpenAI) -> None:
    out = client.completions.create(model="m", prompt=CODE_PROMPT, temperature=0, max_tokens=48)
    assert out.object == "text_completion"
    assert out.choices[0].text.startswith("    return text == ''.join(reversed(text))")
    assert out.choices[0].finish_reason == "stop"


def test_token_id_prompts_batched_with_indices(client: openai.OpenAI, server) -> None:
    tok = server.engine.engine.tokenizer
    prompts = [tok.encode("def add(a, b):\n"), tok.encode("import os\n")]
    out = client.completions.create(model="m", prompt=prompts, temperature=0, max_tokens=8, n=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    # n=2 of a greedy request: both choices of one prompt agree.
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]
    assert out.usage.prompt_tokens == len(prompts[0]) + len(prompts[1])


def test_echo_prepends_the_prompt(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="m", prompt="import os\n", echo=True, temperature=0, max_tokens=4
    )
    assert out.choices[0].text.startswith("import os\n")


def test_models_tokenize_and_detokenize(client: openai.OpenAI, server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["bisllm-tiny-moe"]
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "import os"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 2048
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}).json()
    assert text["prompt"] == "import os"
    chat = httpx.post(
        f"{server.url}/tokenize", json={"messages": user("hi"), "add_generation_prompt": True}
    ).json()
    rendered = server.engine.engine.tokenizer.decode(chat["tokens"])
    assert rendered.endswith("<|im_start|>assistant\n")


# -- sampling controls --------------------------------------------------------------------------


def test_n_2_gives_two_choices(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="m",
        messages=user("Write a haiku about lists."),
        n=2,
        seed=5,
        max_tokens=16,
        logprobs=True,
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content
    assert out.usage.completion_tokens == sum(len(c.logprobs.content) for c in out.choices)


def test_stop_strings_end_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(model="m", prompt=CODE_PROMPT, temperature=0, max_tokens=24)
    assert "join" in free.choices[0].text
    stopped = client.completions.create(
        model="m", prompt=CODE_PROMPT, temperature=0, max_tokens=24, stop=["join"]
    )
    text = stopped.choices[0].text
    assert "join" not in text and free.choices[0].text.startswith(text)
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        out = client.chat.completions.create(
            model="m",
            messages=user("Tell me about `os.path`."),
            temperature=1.0,
            top_p=0.95,
            seed=seed,
            max_tokens=24,
        )
        return out.choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_extras_and_unknown_fields_are_accepted(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="m",
        prompt=CODE_PROMPT,
        max_tokens=12,
        extra_body={
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "ignore_eos": True,
            "min_tokens": 12,
            "stop_token_ids": [],
            "some_future_field": {"x": 1},
        },
        user="someone",
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert out.usage.completion_tokens == 12  # ignore_eos + min_tokens


def test_logit_bias_forces_a_token(client: openai.OpenAI, server) -> None:
    token = server.engine.engine.tokenizer.encode("zebra", add_special_tokens=False)[0]
    out = client.completions.create(
        model="m", prompt="x", max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert out.choices[0].text.startswith(server.engine.engine.tokenizer.decode([token]))


def test_logprobs_in_both_shapes(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="m",
        messages=user("What does `json.dumps` do?"),
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content) == chat.choices[0].message.content

    legacy = client.completions.create(
        model="m", prompt=CODE_PROMPT, temperature=0, max_tokens=6, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob == max(top.values())
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == legacy.choices[0].text


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI) -> None:
    messages = user("Explain what `collections.Counter` counts, in detail, with an example.")
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=4)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 16
    # Full pages of the prompt (16 tokens each) come from the prefix cache the second time.
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


# -- structured outputs and tools -----------------------------------------------------------------

DESCRIPTION = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "module": {"type": "string", "enum": ["os", "os.path", "json", "re"]},
        "kind": {"type": "string", "enum": ["function", "class", "module"]},
        "arity": {"type": "integer", "minimum": 0, "maximum": 5},
    },
    "required": ["name", "module", "kind", "arity"],
    "additionalProperties": False,
}


def test_json_schema_output_is_valid_even_when_sampling(client: openai.OpenAI) -> None:
    for seed in range(3):
        out = client.chat.completions.create(
            model="m",
            messages=user("Describe `os.path.join` as JSON.", system=JSON_SYSTEM),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "description", "schema": DESCRIPTION, "strict": True},
            },
            temperature=1.0,
            seed=seed,
            max_tokens=96,
        )
        content = out.choices[0].message.content
        jsonschema.validate(json.loads(content), DESCRIPTION)
        assert out.choices[0].finish_reason == "stop"
        assert ": " not in content and ", " not in content.replace('", "', "")  # compact


class Description(BaseModel):
    name: str
    module: str
    kind: str


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(
        model="m",
        messages=user("Describe `json.dumps` as JSON.", system=JSON_SYSTEM),
        response_format=Description,
        temperature=0,
        max_tokens=96,
    )
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Description) and parsed.name


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="m",
        messages=user("Describe `re.match` as JSON.", system=JSON_SYSTEM),
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=3,
        max_tokens=128,
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages = user(GCD_QUESTION)
    first = client.chat.completions.create(
        model="m", messages=messages, tools=[GCD_TOOL], temperature=0, max_tokens=64
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "gcd"
    assert json.loads(call.function.arguments) == {"a": 84, "b": 36}
    assert choice.message.content is None
    # Answer the call; the model then replies in text.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "12"},
    ]
    second = client.chat.completions.create(
        model="m", messages=messages, tools=[GCD_TOOL], temperature=0, max_tokens=48
    )
    reply = second.choices[0]
    assert reply.finish_reason in ("stop", "length") and not reply.message.tool_calls
    assert reply.message.content


def test_streamed_tool_call_deltas(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=user(GCD_QUESTION),
            tools=[GCD_TOOL],
            temperature=0,
            max_tokens=64,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "gcd" and calls[0].type == "function"
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert json.loads(arguments) == {"a": 84, "b": 36}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "lcm"}}]
)
def test_forced_tool_choice_is_grammar_constrained(client: openai.OpenAI, tool_choice) -> None:
    lcm = json.loads(json.dumps(GCD_TOOL))
    lcm["function"]["name"] = "lcm"
    lcm["function"]["description"] = "Least common multiple of two integers."
    out = client.chat.completions.create(
        model="m",
        # A question the model would answer in text: only the grammar makes it call a tool.
        messages=user("What does `json.dumps` do?"),
        tools=[GCD_TOOL, lcm],
        tool_choice=tool_choice,
        temperature=1.0,
        seed=1,
        max_tokens=96,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        if isinstance(tool_choice, dict):
            assert call.function.name == "lcm"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, GCD_TOOL["function"]["parameters"])


def test_tool_choice_none_leaves_tools_out(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="m",
        messages=user(GCD_QUESTION),
        tools=[GCD_TOOL],
        tool_choice="none",
        temperature=0,
        max_tokens=32,
    )
    assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason != "tool_calls"


def test_reasoning_is_split_from_content(client: openai.OpenAI, server) -> None:
    """The model opens a think block on some sampled answers; find a seed where it does (on the
    raw completion), then the chat endpoint must move that block to reasoning_content."""
    tok = server.engine.engine.tokenizer
    messages = user("Why would I use `functools.lru_cache`?")
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for seed in range(60):
        raw = client.completions.create(
            model="m", prompt=prompt, temperature=1.0, seed=seed, max_tokens=80
        ).choices[0]
        if raw.text.startswith("<think>") and "</think>" in raw.text:
            break
    else:
        pytest.fail("no seed in 0..59 opened a think block")
    thought, _, answer = raw.text.removeprefix("<think>").partition("</think>")
    out = client.chat.completions.create(
        model="m", messages=messages, temperature=1.0, seed=seed, max_tokens=80
    )
    message = out.choices[0].message
    assert message.reasoning_content == thought.strip()
    assert (message.content or "") == answer.strip()
    assert out.usage.completion_tokens_details.reasoning_tokens > 0
    streamed = list(
        client.chat.completions.create(
            model="m", messages=messages, temperature=1.0, seed=seed, max_tokens=80, stream=True
        )
    )
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in streamed if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert reasoning == thought.strip() and content == (message.content or "")
    assert "<think>" not in content and "</think>" not in reasoning


# -- errors -------------------------------------------------------------------------------------


def test_invalid_input_is_a_400_naming_the_field(client: openai.OpenAI, server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=user("hi"), temperature=7)
    assert err.value.status_code == 400 and "temperature" in str(err.value)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="m", messages=user("hi"), top_logprobs=2)
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no embedding head"):
        client.embeddings.create(model="m", input="hello")


def test_context_length_exceeded_gives_the_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="import os\n", max_tokens=5000)
    body = err.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "prompt"
    assert "maximum context length is 2048 tokens" in body["message"]
    assert "5000 in the completion" in body["message"]
    too_long = "x " * 3000
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="m", messages=user(too_long))


@pytest.fixture(scope="module")
def guarded(server: RunningServer) -> Iterator[RunningServer]:
    """A front with an API key, strict model names and no waiting room beyond the running
    batch (32 requests, from the config's max_batch_size)."""
    settings = ServerSettings(
        served_model_name="bisllm-tiny-moe",
        api_key="sekret",
        max_queued_requests=0,
        strict_model_name=True,
    )
    with second_front(server.engine, settings) as front:
        yield front


def test_api_key_is_required_when_configured(guarded: RunningServer) -> None:
    for key in (None, "wrong"):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        response = httpx.get(f"{guarded.base_url}/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=guarded.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for headers in (
        {"Authorization": "Bearer sekret"},
        {"Api-Key": "sekret"},
        {"Authorization": "Api-Key sekret"},
    ):
        assert httpx.get(f"{guarded.base_url}/models", headers=headers).status_code == 200
    # Probes and scrapes need no key.
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200


def test_strict_mode_rejects_other_model_names(guarded: RunningServer) -> None:
    good = openai.OpenAI(base_url=guarded.base_url, api_key="sekret", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        good.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    out = good.completions.create(model="bisllm-tiny-moe", prompt="x", max_tokens=1)
    assert out.choices[0].text is not None


def test_over_capacity_is_a_503_with_retry_after(guarded: RunningServer) -> None:
    """Room for the running batch (32) and no queue: 33 choices at once are over the bound."""
    headers = {"Authorization": "Bearer sekret"}
    body = {"model": "bisllm-tiny-moe", "prompt": "import os\n", "max_tokens": 4, "n": 33}
    response = httpx.post(f"{guarded.base_url}/completions", json=body, headers=headers)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "server_overloaded"
    # The SDK retries 503 after Retry-After; with retries off it raises.
    sdk = openai.OpenAI(base_url=guarded.base_url, api_key="sekret", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        sdk.completions.create(model="bisllm-tiny-moe", prompt="x", max_tokens=2, n=33)
    assert err.value.status_code == 503
    # A full batch fits, and the bound is free again afterwards.
    full = httpx.post(f"{guarded.base_url}/completions", json={**body, "n": 32}, headers=headers)
    assert full.status_code == 200 and len(full.json()["choices"]) == 32
    assert guarded.serving is not None and guarded.serving.active == 0


# -- disconnects and load -----------------------------------------------------------------------


def _wait_idle(server: RunningServer, timeout: float = 20.0) -> None:
    """Until the engine has no request left (it runs one step after an abort)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.engine.engine.stats
        if (
            stats.num_running == 0
            and stats.num_waiting == 0
            and not server.engine.engine.has_unfinished_requests()
        ):
            return
        time.sleep(0.02)
    pytest.fail(f"engine still busy: {server.engine.engine.stats}")


def test_disconnect_aborts_and_frees_kv(server: RunningServer) -> None:
    _wait_idle(server)
    llm = server.engine.engine
    free_before = llm.allocator.num_free if hasattr(llm.allocator, "num_free") else None
    body = {
        "model": "m",
        "prompt": "import os\n",
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.base_url}/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(lines)
        next(lines)
        assert llm.stats.num_running == 1
    # Leaving the block closed the connection mid-stream.
    _wait_idle(server)
    stats = llm.stats
    assert stats.generation_tokens_total > 0
    # Every page is free or held by the prefix cache only (none by a live request).
    assert stats.kv_pages_used == stats.kv_pages_cached
    if free_before is not None:
        assert llm.allocator.num_free + stats.kv_pages_cached >= free_before


def test_disconnect_of_a_non_streaming_request_aborts_it(server: RunningServer) -> None:
    _wait_idle(server)
    llm = server.engine.engine
    finished_before = llm.stats.num_finished_total
    body = {"model": "m", "prompt": "import os\n", "max_tokens": 1500, "ignore_eos": True}
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.Client(timeout=httpx.Timeout(60, read=1.0)) as http,
    ):
        http.post(f"{server.base_url}/completions", json=body)
    _wait_idle(server)
    stats = llm.stats
    assert stats.kv_pages_used == stats.kv_pages_cached
    # It ended early (aborted), far short of its 1500 tokens.
    assert stats.num_finished_total == finished_before + 1


def test_64_concurrent_streaming_clients(server: RunningServer) -> None:
    aclient: openai.AsyncOpenAI

    async def one(i: int) -> tuple[str, str | None, int]:
        text, finish, tokens = [], None, 0
        stream = await aclient.chat.completions.create(
            model="m",
            messages=user(f"Question {i}: what does `os.path.join` do?"),
            max_tokens=12,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                # Some sampled answers open a think block: that text is reasoning_content.
                text.append(
                    (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
                )
                finish = chunk.choices[0].finish_reason or finish
            else:
                tokens = chunk.usage.completion_tokens
        return "".join(text), finish, tokens

    async def run_all() -> list[tuple[str, str | None, int]]:
        nonlocal aclient
        aclient = async_client(server)
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), timeout=240)

    results = asyncio.run(run_all())
    assert len(results) == 64
    for text, finish, tokens in results:
        assert finish in ("stop", "length") and 1 <= tokens <= 12
        assert text or tokens == 1  # only an immediate end of turn has no text
    _wait_idle(server)


# -- metrics and health ----------------------------------------------------------------------------


def test_health_and_metrics(server: RunningServer, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    client.completions.create(model="m", prompt="x", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "tps_per_request",
        "input_tokens",
        "output_tokens",
        "input_tokens_per_request",
        "output_tokens_per_request",
        "concurrent_requests",
        "speculation_rate",
        "cpu_usage",
        "memory_usage",
        "gpu_usage",
        "gpu_memory_usage",
        "replica_count_by_status",
        'bisllm_in_flight_tokens{model_name="bisllm-tiny-moe"}',
    ):
        assert name in text, name


def test_engine_failure_mid_stream_is_reported_in_band() -> None:
    """Headers are out when the engine dies: the stream ends with an `error` event and
    [DONE] (the SDK raises APIError), and /health turns 503."""
    with tiny_server() as fresh:
        llm = fresh.engine.engine
        real_step, calls = llm.step, {"n": 0}

        def failing_step():  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("device lost")
            return real_step()

        llm.step = failing_step  # type: ignore[method-assign]
        client = openai.OpenAI(base_url=fresh.base_url, api_key="x", max_retries=0)
        stream = client.completions.create(
            model="m",
            prompt=CODE_PROMPT,
            max_tokens=64,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with pytest.raises(openai.APIError, match="device lost"):
            for _ in stream:
                pass
        health = httpx.get(f"{fresh.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        # New requests are refused cleanly, not hung.
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="m", prompt="x", max_tokens=2)
        assert err.value.status_code == 503


def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI, server) -> None:
    """`enable_thinking: false` makes the embedded model's template pre-fill an empty think
    block: the prompt grows by exactly those tokens."""
    messages = user("What does `os.getcwd` do?")
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=1)
    no_think = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    tok = server.engine.engine.tokenizer
    empty_block = len(tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert no_think.usage.prompt_tokens == plain.usage.prompt_tokens + empty_block
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        client.chat.completions.create(
            model="m", messages=messages, extra_body={"chat_template_kwargs": {"tools": []}}
        )
