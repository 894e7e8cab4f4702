"""Paged KV memory: a page allocator, the per-layer K/V buffers, and sizing helpers.

A page holds `page_size` consecutive token positions of one sequence. Buffers are flat over
slots, `slot = page * page_size + offset`, so the attention backend addresses any token with
one int64 index and the allocator only ever deals in page ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_FREE, _USED = 0, 1


class PageAllocator:
    """Free list of page ids with exact accounting; misuse raises instead of corrupting KV."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        # Reversed so pop() hands out low ids first, which keeps test output readable.
        self._free = list(range(num_pages - 1, -1, -1))
        self._state = bytearray(num_pages)  # _FREE / _USED per page: O(1) double-free check

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def is_allocated(self, page: int) -> bool:
        return 0 <= page < self.num_pages and self._state[page] == _USED

    def alloc(self, n: int) -> list[int] | None:
        """`n` pages, or None (allocating nothing) when fewer than `n` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        for p in pages:
            self._state[p] = _USED
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Return pages to the free list; validates all of them before freeing any."""
        if len(set(pages)) != len(pages):
            raise ValueError(f"duplicate page ids in free({list(pages)})")
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page {p} out of range [0, {self.num_pages})")
            if self._state[p] != _USED:
                raise ValueError(f"page {p} is not allocated (double free?)")
        for p in pages:
            self._state[p] = _FREE
        self._free.extend(pages)


def _token_width(head_dim: int, v_head_dim: int | None, shared_kv: bool) -> int:
    """Values stored per token, layer and KV head: K and V, or K alone when V is read from K's
    first `v_head_dim` values (MLA's latent cache)."""
    return head_dim if shared_kv else head_dim + (v_head_dim or head_dim)


def bytes_per_page(
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    *,
    v_head_dim: int | None = None,
    shared_kv: bool = False,
) -> int:
    """K and V for every layer of one page."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    width = _token_width(head_dim, v_head_dim, shared_kv)
    return num_layers * page_size * num_kv_heads * width * itemsize


def pages_for_budget(
    budget_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    *,
    v_head_dim: int | None = None,
    shared_kv: bool = False,
) -> int:
    """How many whole pages fit in `budget_bytes`; ValueError if not even one."""
    per_page = bytes_per_page(
        num_layers,
        num_kv_heads,
        head_dim,
        page_size,
        dtype,
        v_head_dim=v_head_dim,
        shared_kv=shared_kv,
    )
    num_pages = budget_bytes // per_page
    if num_pages < 1:
        width = _token_width(head_dim, v_head_dim, shared_kv)
        raise ValueError(
            f"KV budget of {budget_bytes} bytes is too small: one page needs {per_page} bytes "
            f"({num_layers} layers x {page_size} tokens x {num_kv_heads} kv heads x "
            f"{width} K+V values x {dtype})"
        )
    return num_pages


def kv_budget_bytes(
    device: torch.device | str,
    *,
    cpu_bytes: int,
    gpu_memory_fraction: float,
    weights_bytes: int = 0,
) -> int:
    """Bytes to give the KV pool.

    CPU (and other non-CUDA devices): `cpu_bytes` as configured. CUDA: `gpu_memory_fraction`
    of the memory free right now, minus `weights_bytes` still to be loaded (pass 0 when the
    weights are already resident, since `mem_get_info` then already excludes them).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_bytes
    if not 0.0 < gpu_memory_fraction <= 1.0:
        raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction}")
    free, _total = torch.cuda.mem_get_info(device)
    budget = int(free * gpu_memory_fraction) - weights_bytes
    if budget <= 0:
        raise ValueError(
            f"no memory left for the KV cache on {device}: {gpu_memory_fraction} of "
            f"{free} free bytes is less than the {weights_bytes} bytes of weights"
        )
    return budget


class KVPool:
    """Per-layer K buffers of shape [num_pages * page_size, num_kv_heads, head_dim] and V
    buffers of [..., v_head_dim] (head_dim unless given).

    With `shared_kv` (MLA) only K is stored: a token's single "head" is its compressed latent
    followed by its rotary key, and V is a view of each K buffer's first `v_head_dim` values,
    so the latent is held once and nothing is ever expanded per head in the cache."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        v_head_dim: int | None = None,
        shared_kv: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        if shared_kv and self.v_head_dim > head_dim:
            raise ValueError(f"shared K/V needs v_head_dim <= head_dim, got {v_head_dim}")
        self.shared_kv = shared_kv
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        num_slots = num_pages * page_size
        # Zeros, not empty: padded reads of a stale slot must not inject NaN/Inf into
        # attention (0 probability x NaN value is still NaN).
        self.k_buffers = [
            torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]
        self.v_buffers = (
            [k[..., : self.v_head_dim] for k in self.k_buffers]
            if shared_kv
            else [
                torch.zeros(
                    num_slots, num_kv_heads, self.v_head_dim, dtype=dtype, device=self.device
                )
                for _ in range(num_layers)
            ]
        )
        self.bytes_per_page = bytes_per_page(
            num_layers,
            num_kv_heads,
            head_dim,
            page_size,
            dtype,
            v_head_dim=self.v_head_dim,
            shared_kv=shared_kv,
        )

    def buffer_bytes(self) -> int:
        """Bytes actually allocated for the cache (each storage counted once)."""
        buffers = self.k_buffers if self.shared_kv else self.k_buffers + self.v_buffers
        return sum(b.numel() * b.element_size() for b in buffers)

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def slots_for_pages(self, pages: Sequence[int]) -> torch.Tensor:
        """Flat int64 slots of every position of `pages`, in page order."""
        page_ids = torch.as_tensor(pages, dtype=torch.int64, device=self.device)
        offsets = torch.arange(self.page_size, dtype=torch.int64, device=self.device)
        return (page_ids[:, None] * self.page_size + offsets).reshape(-1)

    def _paged(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.view(self.num_pages, self.page_size, self.num_kv_heads, buf.shape[-1])

    def _stored(self) -> list[list[torch.Tensor]]:
        """Per layer, the buffers that hold data of their own: [k, v], or [k] when shared."""
        if self.shared_kv:
            return [[k] for k in self.k_buffers]
        return [[k, v] for k, v in zip(self.k_buffers, self.v_buffers, strict=True)]

    def export_pages(self, pages: Sequence[int]) -> torch.Tensor:
        """A copy of the pages' KV: [num_layers, parts, len(pages), page_size, kvh, width]:
        parts 2 (k, v; V as wide as K), or 1 (k alone, with `shared_kv`)."""
        if not self.shared_kv and self.v_head_dim != self.head_dim:
            raise NotImplementedError("export_pages needs V as wide as K, or shared K/V")
        idx = torch.as_tensor(pages, dtype=torch.int64, device=self.device)
        per_layer = [torch.stack([self._paged(b)[idx] for b in bufs]) for bufs in self._stored()]
        return torch.stack(per_layer)

    def import_pages(self, pages: Sequence[int], data: torch.Tensor) -> None:
        """Write `data` (as produced by `export_pages`, any device) into `pages`."""
        expected = (
            self.num_layers,
            1 if self.shared_kv else 2,
            len(pages),
            self.page_size,
            self.num_kv_heads,
            self.head_dim,
        )
        if tuple(data.shape) != expected:
            raise ValueError(f"import_pages: data shape {tuple(data.shape)} != {expected}")
        idx = torch.as_tensor(pages, dtype=torch.int64, device=self.device)
        data = data.to(device=self.device, dtype=self.dtype)
        for layer, bufs in enumerate(self._stored()):
            for part, buf in enumerate(bufs):
                self._paged(buf).index_copy_(0, idx, data[layer, part])
