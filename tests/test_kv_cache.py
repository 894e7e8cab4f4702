"""Page allocator accounting, KV pool layout and export/import, and KV budget sizing."""

from __future__ import annotations

import pytest
import torch

from bisllm_server.engine.kv_cache import (
    KVPool,
    PageAllocator,
    bytes_per_page,
    kv_budget_bytes,
    pages_for_budget,
)

# ---- PageAllocator ---------------------------------------------------------------------------


def test_alloc_free_accounting() -> None:
    a = PageAllocator(8)
    assert (a.num_free, a.num_used) == (8, 0)
    x = a.alloc(3)
    assert x is not None and len(set(x)) == 3
    y = a.alloc(5)
    assert y is not None and not set(x) & set(y)
    assert (a.num_free, a.num_used) == (0, 8)
    assert a.alloc(1) is None
    assert a.alloc(0) == []
    a.free(x)
    assert (a.num_free, a.num_used) == (3, 5)
    z = a.alloc(3)
    assert z is not None and sorted(z) == sorted(x)
    assert all(a.is_allocated(p) for p in x + y)


def test_alloc_too_many_allocates_nothing() -> None:
    a = PageAllocator(4)
    assert a.alloc(3) is not None
    assert a.alloc(2) is None
    assert a.num_free == 1


def test_free_errors_leave_state_untouched() -> None:
    a = PageAllocator(4)
    pages = a.alloc(2)
    assert pages is not None
    free_page = next(p for p in range(4) if p not in pages)
    with pytest.raises(ValueError, match="not allocated"):
        a.free([pages[0], free_page])  # second one is bad: the first must not be freed either
    assert a.num_used == 2 and a.is_allocated(pages[0])
    with pytest.raises(ValueError, match="out of range"):
        a.free([4])
    with pytest.raises(ValueError, match="out of range"):
        a.free([-1])
    with pytest.raises(ValueError, match="duplicate"):
        a.free([pages[0], pages[0]])
    a.free(pages)
    with pytest.raises(ValueError, match="double free"):
        a.free([pages[0]])
    with pytest.raises(ValueError):
        a.alloc(-1)
    with pytest.raises(ValueError):
        PageAllocator(0)
    assert a.num_free == 4


# ---- KVPool ----------------------------------------------------------------------------------


def make_pool(dtype: torch.dtype = torch.float32) -> KVPool:
    return KVPool(
        num_layers=3,
        num_kv_heads=2,
        head_dim=4,
        num_pages=6,
        page_size=4,
        dtype=dtype,
        device="cpu",
    )


def test_pool_layout() -> None:
    pool = make_pool(torch.bfloat16)
    assert len(pool.k_buffers) == len(pool.v_buffers) == 3
    for buf in (*pool.k_buffers, *pool.v_buffers):
        assert buf.shape == (24, 2, 4) and buf.dtype == torch.bfloat16
        assert not buf.any()  # zero-filled, so stale padded reads are finite
    assert pool.bytes_per_page == 2 * 3 * 4 * 2 * 4 * 2
    assert pool.slots_for_pages([2, 0]).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]
    assert pool.slots_for_pages([]).tolist() == []


def test_export_import_round_trip() -> None:
    src, dst = make_pool(), make_pool()
    torch.manual_seed(0)
    for buf in (*src.k_buffers, *src.v_buffers):
        buf.copy_(torch.randn_like(buf))
    data = src.export_pages([4, 1])
    assert data.shape == (3, 2, 2, 4, 2, 4)
    # Page 4 of layer 1's V lands at [1, 1, 0]: slots 16..19.
    assert torch.equal(data[1, 1, 0], src.v_buffers[1][16:20])
    # The export is a copy, not a view into the pool.
    src.k_buffers[0].zero_()
    assert data[0, 0].any()

    dst.import_pages([0, 5], data)
    assert torch.equal(dst.export_pages([0, 5]), data)
    assert not dst.export_pages([1, 2, 3, 4]).any()  # nothing else was touched
    with pytest.raises(ValueError, match="shape"):
        dst.import_pages([0], data)


# ---- sizing ----------------------------------------------------------------------------------


def test_pages_for_budget() -> None:
    per_page = bytes_per_page(2, 4, 8, 16, torch.float16)
    assert per_page == 2 * 2 * 16 * 4 * 8 * 2
    assert pages_for_budget(per_page * 10 + per_page - 1, 2, 4, 8, 16, torch.float16) == 10
    with pytest.raises(ValueError, match=f"one page needs {per_page} bytes"):
        pages_for_budget(per_page - 1, 2, 4, 8, 16, torch.float16)


def test_kv_budget_bytes_cpu() -> None:
    assert kv_budget_bytes("cpu", cpu_bytes=1234, gpu_memory_fraction=0.5) == 1234
    assert kv_budget_bytes(torch.device("cpu"), cpu_bytes=7, gpu_memory_fraction=0.9) == 7


def test_kv_budget_bytes_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: fake the driver query, the arithmetic is what matters.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert kv_budget_bytes("cuda:0", cpu_bytes=1, gpu_memory_fraction=0.5) == 500
    assert kv_budget_bytes("cuda", cpu_bytes=1, gpu_memory_fraction=0.5, weights_bytes=100) == 400
    with pytest.raises(ValueError, match="no memory left"):
        kv_budget_bytes("cuda", cpu_bytes=1, gpu_memory_fraction=0.5, weights_bytes=500)
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        kv_budget_bytes("cuda", cpu_bytes=1, gpu_memory_fraction=0.0)
