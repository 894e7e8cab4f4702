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


def bytes_per_page(
    num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype
) -> int:
    """K and V for every layer of one page."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize


def pages_for_budget(
    budget_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
) -> int:
    """How many whole pages fit in `budget_bytes`; ValueError if not even one."""
    per_page = bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)
    num_pages = budget_bytes // per_page
    if num_pages < 1:
        raise ValueError(
            f"KV budget of {budget_bytes} bytes is too small: one page needs {per_page} bytes "
            f"({num_layers} layers x 2 x {page_size} tokens x {num_kv_heads} kv heads x "
            f"{head_dim} dims x {dtype})"
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
    """Per-layer K and V buffers of shape [num_pages * page_size, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_pages * page_size, num_kv_heads, head_dim)
        # Zeros, not empty: padded reads of a stale slot must not inject NaN/Inf into
        # attention (0 probability x NaN value is still NaN).
        self.k_buffers = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.v_buffers = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.bytes_per_page = bytes_per_page(num_layers, num_kv_heads, head_dim, page_size, dtype)

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def slots_for_pages(self, pages: Sequence[int]) -> torch.Tensor:
        """Flat int64 slots of every position of `pages`, in page order."""
        page_ids = torch.as_tensor(pages, dtype=torch.int64, device=self.device)
        offsets = torch.arange(self.page_size, dtype=torch.int64, device=self.device)
        return (page_ids[:, None] * self.page_size + offsets).reshape(-1)

    def _paged(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.view(self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)

    def export_pages(self, pages: Sequence[int]) -> torch.Tensor:
        """A copy of the pages' KV: [num_layers, 2 (k, v), len(pages), page_size, kvh, hd]."""
        idx = torch.as_tensor(pages, dtype=torch.int64, device=self.device)
        per_layer = [
            torch.stack((self._paged(k)[idx], self._paged(v)[idx]))
            for k, v in zip(self.k_buffers, self.v_buffers, strict=True)
        ]
        return torch.stack(per_layer)

    def import_pages(self, pages: Sequence[int], data: torch.Tensor) -> None:
        """Write `data` (as produced by `export_pages`, any device) into `pages`."""
        expected = (
            self.num_layers,
            2,
            len(pages),
            self.page_size,
            self.num_kv_heads,
            self.head_dim,
        )
        if tuple(data.shape) != expected:
            raise ValueError(f"import_pages: data shape {tuple(data.shape)} != {expected}")
        idx = torch.as_tensor(pages, dtype=torch.int64, device=self.device)
        data = data.to(device=self.device, dtype=self.dtype)
        for layer, (k, v) in enumerate(zip(self.k_buffers, self.v_buffers, strict=True)):
            self._paged(k).index_copy_(0, idx, data[layer, 0])
            self._paged(v).index_copy_(0, idx, data[layer, 1])
