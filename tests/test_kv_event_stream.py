"""The worker's `/kv_events` stream: the event log (ids, replay, snapshots, wake-ups) against a
bare publisher, then the live route on the embedded model over real HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_fixtures import RunningServer, second_front, tiny_server

from bisllm_server.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventPublisher,
    hash_token_blocks,
)
from bisllm_server.openai.kv_event_stream import EventsLost, KVEventLog, kv_event_lines
from bisllm_server.openai.serving import ServerSettings

BS = 4  # block size of the unit tests


def stored(tokens: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(hash_token_blocks(tokens, BS, parent), parent, tokens, BS)


def assert_parents_first(blocks: list[list[int | None]]) -> None:
    seen: set[int] = set()
    for block, parent in blocks:
        assert parent is None or parent in seen, f"{block} listed before its parent {parent}"
        assert isinstance(block, int)
        seen.add(block)


# -- KVEventLog against a bare publisher -------------------------------------------------------


def test_ids_are_consecutive_and_replay_returns_exactly_the_later_events() -> None:
    pub = KVEventPublisher()
    log = KVEventLog(pub, block_size=BS)
    assert log.last_event_id == 0
    assert log.read_since(0, log.instance) == (None, [], 0)
    events = [stored([i] * 8) for i in range(5)]
    for event in events:
        pub.publish(event)
    assert log.last_event_id == 5
    logged = log.events_since(0)
    assert [k for k, _ in logged] == [1, 2, 3, 4, 5]
    assert [e for _, e in logged] == [event.to_dict() for event in events]

    blocks, replay, last = log.read_since(2, log.instance)
    assert blocks is None and last == 5
    assert replay == logged[2:]
    assert log.read_since(5, log.instance) == (None, [], 5)
    assert log.events_since(5) == []


def test_unknown_instance_or_a_since_older_than_the_ring_gets_a_snapshot() -> None:
    pub = KVEventPublisher()
    log = KVEventLog(pub, block_size=BS, capacity=3)
    trunk = stored(list(range(12)))  # 3 blocks
    branch = stored(list(range(100, 108)), parent=trunk.block_hashes[1])  # off the 2nd block
    other = stored(list(range(200, 204)))
    for event in (trunk, branch, other):
        pub.publish(event)
    pub.publish(BlockRemoved([branch.block_hashes[1]]))
    pub.publish(BlockRemoved([other.block_hashes[0]]))
    t, b = trunk.block_hashes, branch.block_hashes
    expected = [[t[0], None], [t[1], t[0]], [t[2], t[1]], [b[0], t[1]]]

    # ring holds ids 3..5: since=2 still replays, since=1 needs event 2, which is gone
    assert log.read_since(2, log.instance)[0] is None
    with pytest.raises(EventsLost):
        log.events_since(1)
    for since, instance in ((1, log.instance), (None, log.instance), (5, "another"), (5, None)):
        blocks, replay, last = log.read_since(since, instance)
        assert (blocks, replay, last) == (expected, [], 5)
    assert_parents_first(expected)
    # a since from the future (a different worker's count) is no basis for a replay either
    assert log.read_since(9, log.instance)[0] == expected

    pub.publish(AllBlocksCleared())
    assert log.read_since(None, None) == ([], [], 6)
    pub.publish(other)  # re-stored after a clear: the mirror starts over
    assert log.read_since(None, None)[0] == [[other.block_hashes[0], None]]


def test_publishing_on_another_thread_wakes_an_async_waiter_once() -> None:
    pub = KVEventPublisher()
    log = KVEventLog(pub, block_size=BS)
    waiting_at_publish: list[int] = []

    def engine_thread() -> None:
        waiting_at_publish.append(len(log._waiters))
        pub.publish(stored([1, 2, 3, 4]))
        # the woken waiter is dropped: the rest of a burst schedules nothing on its loop
        waiting_at_publish.append(len(log._waiters))
        pub.publish(AllBlocksCleared())

    async def main() -> bool:
        waiting = asyncio.create_task(log.wait_for(0, timeout=60))
        thread = threading.Thread(target=engine_thread)
        # FIFO: the task's first step (registering its waiter) runs before the thread starts.
        asyncio.get_running_loop().call_soon(thread.start)
        woken = await waiting
        await asyncio.to_thread(thread.join)  # its second event is published too
        assert await log.wait_for(0, timeout=60)  # already past: returns at once
        assert not await log.wait_for(log.last_event_id, timeout=0.01)  # nothing new
        assert not log._waiters
        return woken

    assert asyncio.run(main())
    assert waiting_at_publish == [1, 0]


def test_the_stream_snapshots_then_follows_and_ends_when_the_consumer_falls_behind() -> None:
    pub = KVEventPublisher()
    log = KVEventLog(pub, block_size=BS, capacity=4)
    first = stored(list(range(8)))
    pub.publish(first)

    async def main() -> None:
        lines = kv_event_lines(log, lambda: {"in_flight_tokens": 7}, None, None, load_interval=3600)

        async def next_obj() -> dict[str, Any]:
            return json.loads(await anext(lines))

        assert await next_obj() == {
            "type": "hello",
            "instance": log.instance,
            "block_size": BS,
            "last_event_id": 1,
            "role": "both",
        }
        h = first.block_hashes
        assert await next_obj() == {
            "type": "snapshot",
            "id": 1,
            "blocks": [[h[0], None], [h[1], h[0]]],
        }
        assert await next_obj() == {"type": "load", "in_flight_tokens": 7}
        waiting = asyncio.ensure_future(next_obj())
        loop = asyncio.get_running_loop()
        loop.call_soon(threading.Thread(target=pub.publish, args=(BlockRemoved([h[1]]),)).start)
        assert await waiting == {"type": "event", "id": 2, "event": BlockRemoved([h[1]]).to_dict()}
        for _ in range(5):  # more than the ring holds before the stream reads again
            pub.publish(AllBlocksCleared())
        with pytest.raises(StopAsyncIteration):
            await anext(lines)

    asyncio.run(main())


# -- the live route -----------------------------------------------------------------------------

KEY = "kv-sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(one_torch_thread: None) -> Iterator[RunningServer]:
    with tiny_server(api_key=KEY) as running:
        yield running


class Lines:
    """The parsed lines of one open `/kv_events` response."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("application/x-ndjson")
        self._lines = response.iter_lines()

    def next(self) -> dict[str, Any]:
        return json.loads(next(self._lines))

    def until(self, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The next line of type `kind`, and every line before it."""
        before = []
        while (obj := self.next())["type"] != kind:
            before.append(obj)
        return obj, before


def open_stream(client: httpx.Client, server: RunningServer, **params: Any):
    return client.stream("GET", f"{server.url}/kv_events", params=params, headers=AUTH)


def test_a_completion_streams_its_prompt_blocks_and_a_reconnect_resumes(
    server: RunningServer,
) -> None:
    prompt = f"kv events {uuid.uuid4().hex} " + "the quick brown fox jumps over the lazy dog " * 8
    client = httpx.Client(timeout=60)
    ids = client.post(f"{server.url}/tokenize", json={"prompt": prompt}, headers=AUTH).json()
    expected = hash_token_blocks(ids["tokens"], 16)
    assert len(expected) >= 4

    with open_stream(client, server) as response:
        stream = Lines(response)
        hello = stream.next()
        assert hello["type"] == "hello" and hello["block_size"] == 16
        instance, start = hello["instance"], hello["last_event_id"]
        snapshot = stream.next()
        assert snapshot["type"] == "snapshot" and snapshot["id"] == start
        load, _ = stream.until("load")
        assert load["kv_pages_total"] > 0 and load["max_num_tokens"] > 0
        assert load["max_batch_size"] > 0

        out = client.post(
            f"{server.url}/v1/completions",
            json={"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0},
            headers=AUTH,
        )
        assert out.status_code == 200, out.text
        # Read until every prompt block is mirrored; the stream is the only thing we wait on.
        mirror = {block: parent for block, parent in snapshot["blocks"]}
        event_ids, loads = [], 0
        while not all(block in mirror for block in expected):
            obj = stream.next()
            if obj["type"] == "load":
                loads += 1
                assert loads < 120, "the prompt's blocks never arrived"
                continue
            assert obj["type"] == "event"
            event_ids.append(obj["id"])
            event = obj["event"]
            if event["type"] == "BlockStored":
                parent = event["parent_block_hash"]
                for block in event["block_hashes"]:
                    mirror[block] = parent
                    parent = block
            elif event["type"] == "BlockRemoved":
                for block in event["block_hashes"]:
                    mirror.pop(block, None)
        assert event_ids == list(range(start + 1, start + 1 + len(event_ids)))
        # the prompt is new, so its blocks form a fresh chain from the root
        assert [mirror[b] for b in expected] == [None, *expected[:-1]]
        last = event_ids[-1]
        load, _ = stream.until("load")  # the idle heartbeat keeps coming
        assert load["prompt_tokens_total"] >= len(ids["tokens"])

    # Resume where we left off: nothing already seen is replayed, and no snapshot.
    with open_stream(client, server, since=last, instance=instance) as response:
        stream = Lines(response)
        hello = stream.next()
        assert hello["instance"] == instance and hello["last_event_id"] >= last
        _, before = stream.until("load")
        assert all(obj["type"] == "event" for obj in before)
        assert [obj["id"] for obj in before] == list(range(last + 1, hello["last_event_id"] + 1))

    # Another instance (as after a worker restart): a snapshot holding the prompt's blocks.
    with open_stream(client, server, since=last, instance="not-" + instance) as response:
        stream = Lines(response)
        hello = stream.next()
        snapshot = stream.next()
        assert snapshot["type"] == "snapshot" and snapshot["id"] == hello["last_event_id"]
        assert_parents_first(snapshot["blocks"])
        blocks = dict(map(tuple, snapshot["blocks"]))
        assert [blocks[b] for b in expected] == [None, *expected[:-1]]
        assert stream.until("load")[1] == []
    client.close()


def test_kv_events_needs_the_api_key(server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server.url}/kv_events", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.get(f"{server.url}/kv_events", params={"since": "x"}, headers=AUTH)
    assert response.status_code == 400


def test_a_server_without_a_log_answers_404(server: RunningServer) -> None:
    settings = ServerSettings(served_model_name="bisllm-tiny-moe")
    with second_front(server.engine, settings) as front:
        response = httpx.get(f"{front.url}/kv_events")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
