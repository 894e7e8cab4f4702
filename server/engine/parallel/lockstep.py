"""Keeping the engines of a parallel replica in step while they serve.

Every rank of a tensor-parallel replica runs a whole `LLMEngine` over its shard, and their
forward passes meet in collectives, so every rank must schedule the same batch at every step.
Two cases:

- **Tensor parallel** (one scheduler for all ranks): rank 0, the *leader*, serves HTTP. At
  the start of each step it broadcasts what its inbox brought (new requests, aborts) to the
  *followers*, and after the forward pass what it sampled (SGLang broadcasts its scheduler's
  inputs the same way). The followers never sample: they replay the leader's choices, so
  grammars, seeds, logit bias and logits processors live on the leader alone, and no
  difference in floating point can make a follower pick another token. A digest of each
  engine's state rides along, so a follower that drifts anyway stops with `LockstepError`
  instead of deadlocking in a collective.
- **DP attention** (one scheduler per rank, `DPAttentionPacer`): each rank serves its own
  requests, but the MLP/MoE collectives need every rank at every forward. Before each step the
  ranks agree (one small all-reduce) whether any of them has work; a rank without work then
  joins with an empty batch.

Messages travel on a gloo group even when the model's collectives use NCCL: they are Python
objects, and the CPU group keeps them off the GPU streams.

An idle replica makes no collective calls that could time out: the tensor-parallel leader
sends an empty step every `heartbeat_s`, and DP-attention ranks poll every `poll_s`.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.distributed as dist

from bisllm_server.engine.kv_handoff import KVHandoff
from bisllm_server.engine.sampling import SampleOutput, SamplingParams

# How long an idle tensor-parallel leader waits before sending an empty step: far below any
# collective timeout (gloo's and NCCL's default is 10 to 30 minutes).
HEARTBEAT_S = 30.0
# How often an idle DP-attention rank checks whether a peer has work: the added latency of a
# request that reaches an idle replica.
DP_POLL_S = 0.005
# Step messages up to this size take one broadcast (a decode step's are a few hundred bytes).
INLINE_BYTES = 64 * 1024
_HEADER = 8  # the message's length, an int64


class LockstepError(RuntimeError):
    """A follower's engine state differs from its leader's: continuing would deadlock or
    produce wrong tokens, so the rank stops."""


class _Placeholder:
    """Stands in for a logits processor on a follower, which never samples: the follower only
    needs to know that the request has one (it decides whether the request speculates)."""


@dataclass(frozen=True)
class MirroredRequest:
    """A request as the followers rebuild it: the leader's arrival number keeps their queues
    in the leader's order."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    detokenize: bool
    # Disaggregation: the prefill side's export, the decode side's handoff (every KV head).
    export_kv_from: int | None = None
    kv: KVHandoff | None = None


def mirrored_params(params: SamplingParams) -> SamplingParams:
    """`params` without what cannot (or need not) travel: logits processors (grammar
    matchers, logit bias) become placeholders, one for one."""
    return replace(params, logits_processors=[_Placeholder() for _ in params.logits_processors])


@dataclass(frozen=True)
class StepInputs:
    """What the leader's inbox brought for one step, in order: ("add", MirroredRequest) or
    ("abort", request_id). `digest` is the leader's state before the step; `stop` ends the
    followers' loops."""

    digest: tuple[int, ...]
    inbox: list[tuple[str, Any]] = field(default_factory=list)
    stop: bool = False


@dataclass(frozen=True)
class StepChoices:
    """What the leader chose after one forward pass: the sampled tokens of the plain rows,
    the rows no token was allowed for, and the tokens kept by each draft verification."""

    sampled: SampleOutput | None
    dead: frozenset[int]
    verified: list[list[int]]


class _Channel:
    """Pickled objects from the leader to its followers. A message that fits `INLINE_BYTES`
    travels in one broadcast of a fixed-size buffer (its length first); a larger one (new
    long prompts, a K/V handoff) in a second broadcast of exactly its size. torch's
    broadcast_object_list always takes two, and a step sends two messages."""

    def __init__(self, group: Any, leader: int) -> None:
        self.group = group  # a gloo process group of the leader and its followers
        self.leader = leader  # the leader's global rank
        self._buffer = torch.zeros(INLINE_BYTES + _HEADER, dtype=torch.uint8)

    def _broadcast(self, obj: Any = None) -> Any:
        buffer = self._buffer
        sending = dist.get_rank() == self.leader
        if sending:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            buffer[:_HEADER] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
            if len(payload) <= INLINE_BYTES:
                buffer[_HEADER : _HEADER + len(payload)] = torch.frombuffer(
                    bytearray(payload), dtype=torch.uint8
                )
        dist.broadcast(buffer, src=self.leader, group=self.group)
        size = int(buffer[:_HEADER].view(torch.int64))
        if size <= INLINE_BYTES:
            if sending:
                return obj
            return pickle.loads(buffer[_HEADER : _HEADER + size].numpy().tobytes())
        large = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            if sending
            else torch.empty(size, dtype=torch.uint8)
        )
        dist.broadcast(large, src=self.leader, group=self.group)
        return obj if sending else pickle.loads(large.numpy().tobytes())


class StepLeader(_Channel):
    """The leader's end: publishes each step's inputs and choices."""

    def publish_inputs(self, inputs: StepInputs) -> None:
        self._broadcast(inputs)

    def publish_choices(self, choices: StepChoices) -> None:
        self._broadcast(choices)


class StepFollower(_Channel):
    """A follower's end: receives what the leader published, in the same order."""

    def receive_inputs(self) -> StepInputs:
        return self._broadcast()

    def receive_choices(self) -> StepChoices:
        return self._broadcast()


def check_digest(rank: int, step: int, mine: tuple[int, ...], leader: tuple[int, ...]) -> None:
    if mine != leader:
        raise LockstepError(
            f"rank {rank} diverged from its leader before step {step}: (step, unfinished "
            f"requests, generated tokens) is {mine} here and {leader} on the leader"
        )


# -- pacing the stepping thread ---------------------------------------------------------------


class StepPacer(Protocol):
    """When the async engine's stepping thread steps: `next_step` blocks until a step should
    run (True) or the thread should end (False); `close` runs once as it ends."""

    def next_step(
        self, has_work: Callable[[], bool], wakeup: threading.Event, stopping: Callable[[], bool]
    ) -> bool: ...

    def close(self) -> None: ...


class LocalPacer:
    """One engine on its own: step while there is work, sleep until woken otherwise."""

    def next_step(
        self, has_work: Callable[[], bool], wakeup: threading.Event, stopping: Callable[[], bool]
    ) -> bool:
        while not stopping():
            wakeup.clear()  # before looking, so a request queued meanwhile still wakes us
            if has_work():
                return True
            wakeup.wait()
        return False

    def close(self) -> None:
        pass


class LeaderPacer:
    """A tensor-parallel leader: like `LocalPacer`, plus an empty step after `heartbeat_s`
    idle (the followers wait in a broadcast, which must not time out), and a stop message to
    the followers when it ends."""

    def __init__(self, leader: StepLeader, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.leader = leader
        self.heartbeat_s = heartbeat_s

    def next_step(
        self, has_work: Callable[[], bool], wakeup: threading.Event, stopping: Callable[[], bool]
    ) -> bool:
        while not stopping():
            wakeup.clear()
            if has_work() or not wakeup.wait(self.heartbeat_s):
                return True  # work, or a heartbeat
        return False

    def close(self) -> None:
        self.leader.publish_inputs(StepInputs(digest=(), stop=True))


class DPAttentionPacer:
    """A DP-attention rank: all ranks step together while any has work, and end together once
    every one of them is stopping with nothing left to do."""

    def __init__(self, group: Any, poll_s: float = DP_POLL_S) -> None:
        self.group = group
        self.poll_s = poll_s

    def next_step(
        self, has_work: Callable[[], bool], wakeup: threading.Event, stopping: Callable[[], bool]
    ) -> bool:
        while True:
            wakeup.clear()
            if not has_work() and not stopping():
                wakeup.wait(self.poll_s)
            flags = torch.tensor([int(has_work()), int(not stopping())])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            if flags[0]:
                return True
            if not flags[1]:
                return False

    def close(self) -> None:
        pass


__all__ = [
    "INLINE_BYTES",
    "DPAttentionPacer",
    "LeaderPacer",
    "LocalPacer",
    "LockstepError",
    "MirroredRequest",
    "StepChoices",
    "StepFollower",
    "StepInputs",
    "StepLeader",
    "StepPacer",
    "check_digest",
    "mirrored_params",
]
