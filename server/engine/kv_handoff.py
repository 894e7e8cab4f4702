"""A prefilled request's KV, handed from a prefill engine to a decode engine (disaggregation).

The prefill side runs a request with `hold_kv=True`: when it finishes (after its first
token) its pages stay allocated until `release_kv`, and `export_kv` copies them out as a
`KVHandoff`. The decode side passes the handoff to `add_request(..., kv=...)`: at admission
it reserves pages, writes the K/V of every prompt position its own prefix cache does not
already hold, and continues decoding from the first token, as if it had prefilled itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
