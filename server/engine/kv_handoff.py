"""A prompt prefix's KV, handed from a prefill engine to a decode engine (disaggregation).

The prefill side runs the prompt minus its last token with `export_kv_from=k`: when that
request finishes, the engine copies the K/V of its pages k.. out as a `KVHandoff` (on the
final output) and frees them at once, so nothing is held between engines. The decode side
passes the handoff to `add_request(prompt, ..., kv=...)`: at admission it writes the K/V of
every position its own prefix cache (or its reservation, `reserve_kv`) does not already hold
and computes only the rest, normally the last prompt token. So the first token is sampled on
the decode side, with the request's own sampling state (seed, grammar, logit bias): the
output is the one aggregated serving gives.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import torch

# Wire format: MAGIC, a little-endian u32 header length, the JSON header, the raw K/V bytes.
MAGIC = b"BKV1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HandoffFormatError(ValueError):
    """A serialized handoff is truncated, corrupted or not one at all."""


@dataclass
class KVHandoff:
    prompt_ids: list[int]  # the prefix whose K/V this is (positions 0 .. len - 1)
    page_size: int
    # KVPool.export_pages of pages start_page .. ceil(len(prompt_ids) / page_size) - 1:
    # [num_layers, parts, num_pages, page_size, num_kv_heads, width]. The pages before
    # start_page were already cached on the decode side, so they are not sent.
    data: torch.Tensor
    start_page: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_pages(self) -> int:
        """Pages the prefix spans, sent or not."""
        return -(-self.num_tokens // self.page_size)

    def validate(self) -> None:
        pages = self.num_pages - self.start_page
        if self.start_page < 0 or pages < 0:
            raise ValueError(
                f"kv: start_page {self.start_page} is outside the {self.num_pages} pages of "
                f"{self.num_tokens} tokens"
            )
        if self.data.dim() != 6 or self.data.shape[2] != pages:
            raise ValueError(
                f"kv: data holds {tuple(self.data.shape)}, expected 6 dims with {pages} pages "
                f"(pages {self.start_page}.. of {self.num_tokens} tokens, page_size "
                f"{self.page_size})"
            )

    def to_bytes(self) -> bytes:
        """The handoff as one buffer, its K/V bytes covered by a sha256 in the header."""
        data = self.data.detach().to("cpu").contiguous()
        raw = data.view(torch.uint8).numpy().tobytes()
        dtype = str(data.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"kv: cannot serialize K/V of dtype {dtype}")
        header = json.dumps(
            {
                "prompt_ids": self.prompt_ids,
                "page_size": self.page_size,
                "start_page": self.start_page,
                "dtype": dtype,
                "shape": list(data.shape),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        ).encode()
        return MAGIC + struct.pack("<I", len(header)) + header + raw

    @classmethod
    def from_bytes(cls, payload: bytes | bytearray) -> KVHandoff:
        """Parse `to_bytes` output; HandoffFormatError names what is wrong with it. A
        bytearray (what a receiver fills) is used in place, without another copy."""
        if payload[:4] != MAGIC:
            raise HandoffFormatError("kv handoff: bad magic (not a serialized handoff)")
        if len(payload) < 8:
            raise HandoffFormatError("kv handoff: truncated before the header length")
        (size,) = struct.unpack("<I", payload[4:8])
        try:
            header = json.loads(payload[8 : 8 + size])
            dtype = _DTYPES[header["dtype"]]
            shape = [int(n) for n in header["shape"]]
            prompt_ids = [int(t) for t in header["prompt_ids"]]
            page_size, start_page = int(header["page_size"]), int(header["start_page"])
            checksum = str(header["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise HandoffFormatError(f"kv handoff: unreadable header ({exc!r})") from exc
        raw = memoryview(payload if isinstance(payload, bytearray) else bytearray(payload))
        raw = raw[8 + size :]
        expected = dtype.itemsize
        for n in shape:
            expected *= n
        if len(raw) != expected:
            raise HandoffFormatError(
                f"kv handoff: {len(raw)} bytes of K/V, the header announces {expected}"
            )
        if hashlib.sha256(raw).hexdigest() != checksum:
            raise HandoffFormatError("kv handoff: K/V checksum mismatch (corrupted in transit)")
        if expected:
            data = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
        else:  # every page was cached on the decode side (frombuffer refuses empty buffers)
            data = torch.empty(shape, dtype=dtype)
        handoff = cls(prompt_ids, page_size, data, start_page)
        try:
            handoff.validate()
        except ValueError as exc:
            raise HandoffFormatError(str(exc)) from exc
        return handoff
