"""A prefilled request's KV, handed from a prefill engine to a decode engine (disaggregation).

The prefill side runs a request with `hold_kv=True`: when it finishes (after its first
token) its pages stay allocated until `release_kv`, and `export_kv` copies them out as a
`KVHandoff`. The decode side passes the handoff to `add_request(..., kv=...)`: at admission
it reserves pages, writes the K/V of every prompt position its own prefix cache does not
already hold, and continues decoding from the first token, as if it had prefilled itself.
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
    prompt_ids: list[int]
    first_token: int  # sampled by the prefill side; the decode side's first output token
    page_size: int
    # KVPool.export_pages of the pages holding positions 0 .. len(prompt_ids) - 1:
    # [num_layers, parts, num_pages, page_size, num_kv_heads, width]
    data: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)

    def validate(self) -> None:
        pages = -(-self.num_tokens // self.page_size)
        if self.data.dim() != 6 or self.data.shape[2] != pages:
            raise ValueError(
                f"kv: data holds {tuple(self.data.shape)}, expected 6 dims with {pages} pages "
                f"for {self.num_tokens} tokens of page_size {self.page_size}"
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
                "first_token": self.first_token,
                "page_size": self.page_size,
                "dtype": dtype,
                "shape": list(data.shape),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        ).encode()
        return MAGIC + struct.pack("<I", len(header)) + header + raw

    @classmethod
    def from_bytes(cls, payload: bytes) -> KVHandoff:
        """Parse `to_bytes` output; HandoffFormatError names what is wrong with it."""
        if payload[:4] != MAGIC:
            raise HandoffFormatError("kv handoff: bad magic (not a serialized handoff)")
        if len(payload) < 8:
            raise HandoffFormatError("kv handoff: truncated before the header length")
        (size,) = struct.unpack("<I", payload[4:8])
        try:
            header = json.loads(payload[8 : 8 + size])
            dtype = _DTYPES[header["dtype"]]
            shape = [int(n) for n in header["shape"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise HandoffFormatError(f"kv handoff: unreadable header ({exc})") from exc
        raw = payload[8 + size :]
        expected = dtype.itemsize
        for n in shape:
            expected *= n
        if len(raw) != expected:
            raise HandoffFormatError(
                f"kv handoff: {len(raw)} bytes of K/V, the header announces {expected}"
            )
        if hashlib.sha256(raw).hexdigest() != header["sha256"]:
            raise HandoffFormatError("kv handoff: K/V checksum mismatch (corrupted in transit)")
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        handoff = cls(
            prompt_ids=[int(t) for t in header["prompt_ids"]],
            first_token=int(header["first_token"]),
            page_size=int(header["page_size"]),
            data=data,
        )
        try:
            handoff.validate()
        except ValueError as exc:
            raise HandoffFormatError(str(exc)) from exc
        return handoff
