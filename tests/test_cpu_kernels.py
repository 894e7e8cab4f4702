"""The C++ CPU kernels (decode attention over the paged pool, small-batch fused experts) against
the PyTorch computations they replace, at both one and two intra-op threads, plus their input
checks and the backends that route to them.

The kernels must build here: CI has a compiler, and a silent fallback would leave them
untested (the engine-level comparisons with transformers run with them on)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from bisllm_server.engine import cpu_kernels
from bisllm_server.engine.cpu_kernels.backends import CpuAttentionBackend, CpuExpertsBackend
from bisllm_server.engine.forward_batch import ForwardBatch

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    assert cpu_kernels.available(), f"the CPU kernels did not build: {cpu_kernels.failure()}"


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def reference_decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """fp32 SDPA, one sequence at a time, over the gathered context."""
    num_kv_heads = k_buf.shape[1]
    group = q.shape[1] // num_kv_heads
    outs = []
    for seq in range(q.shape[0]):
        picked = slots[seq, : lens[seq]]
        keys = k_buf[picked].float().transpose(0, 1)  # [KVH, L, D]
        values = v_buf[picked].float().transpose(0, 1)
        query = q[seq].float().view(num_kv_heads, group, -1)
        out = F.scaled_dot_product_attention(query, keys, values, scale=scale)
        outs.append(out.reshape(q.shape[1], -1))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads"),
    [(32, 4, 2), (64, 8, 8), (128, 6, 2), (24, 4, 1)],  # 24: the generic, not unrolled, path
)
def test_decode_attention_matches_sdpa(threads, dtype, head_dim, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(head_dim * 31 + num_heads)
    num_slots, max_kv = 400, 37
    k_buf = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_buf = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([37, 1, 20, 33, 5])
    # Each sequence's context sits in scattered slots, as pages of a shared pool do.
    slots = torch.stack([torch.randperm(num_slots, generator=gen)[:max_kv] for _ in lens])
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5

    out = torch.ops.bisllm_cpu.decode_attention(q, k_buf, v_buf, slots, lens, scale)

    assert out.dtype == dtype and out.shape == q.shape
    expected = reference_decode_attention(q, k_buf, v_buf, slots, lens, scale)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=TOLERANCE[dtype])


def test_decode_attention_reads_only_each_sequence_context():
    # Slots past a sequence's kv_len hold garbage (NaN); they must never be read.
    k_buf = torch.randn(64, 1, 32)
    v_buf = torch.randn(64, 1, 32)
    k_buf[40:], v_buf[40:] = float("nan"), float("nan")
    slots = torch.stack([torch.arange(0, 48), torch.arange(16, 64)])
    lens = torch.tensor([40, 24])
    q = torch.randn(2, 2, 32)
    out = torch.ops.bisllm_cpu.decode_attention(q, k_buf, v_buf, slots, lens, 0.2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out, reference_decode_attention(q, k_buf, v_buf, slots, lens, 0.2), rtol=0, atol=2e-6
    )


def test_decode_attention_rejects_bad_input():
    q, buf = torch.randn(2, 4, 32), torch.randn(16, 2, 32)
    slots = torch.zeros(2, 8, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"kv_lens\[1\] = 9 is outside \[1, 8\]"):
        torch.ops.bisllm_cpu.decode_attention(q, buf, buf, slots, torch.tensor([3, 9]), 1.0)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        torch.ops.bisllm_cpu.decode_attention(
            torch.randn(2, 3, 32), buf, buf, slots, torch.tensor([3, 4]), 1.0
        )
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.bisllm_cpu.decode_attention(
            q.double(), buf, buf, slots, torch.tensor([3, 4]), 1.0
        )


def transposed_storage(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(1, 2).contiguous().transpose(1, 2)


def reference_experts(x, ids, weights, w13, w2) -> torch.Tensor:
    """fp32, one matmul pair per (token, slot): sum_j w[t, j] * expert_ids[t, j](x[t])."""
    x, weights, w13, w2 = x.float(), weights.float(), w13.float(), w2.float()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, expert in enumerate(ids[t].tolist()):
            gate, up = (w13[expert] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[expert] @ (torch.nn.functional.silu(gate) * up))
    return out


def expert_case(
    dtype: torch.dtype, tokens: int, experts: int, top_k: int, hidden: int, inter: int, seed: int
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) * 0.2).to(dtype)
    ids = torch.randn(tokens, experts, generator=gen).topk(top_k).indices
    weights = torch.rand(tokens, top_k, generator=gen).softmax(-1).to(dtype)
    return x, ids, weights, w13, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter"),
    [
        (32, 64, 8, 128, 48),  # qwen3-like decode batch
        (7, 16, 4, 72, 40),  # column tails (72, 80 are not multiples of 16), odd row counts
        (1, 8, 2, 64, 96),  # one token: most experts idle
        (50, 4, 3, 16, 8),  # more rows per expert than one register tile
    ],
)
def test_fused_experts_matches_per_expert_matmuls(
    threads, dtype, tokens, experts, top_k, hidden, inter
):
    x, ids, weights, w13, w2 = expert_case(dtype, tokens, experts, top_k, hidden, inter, tokens)
    out = torch.ops.bisllm_cpu.fused_experts(
        x, ids, weights, transposed_storage(w13), transposed_storage(w2)
    )
    assert out.dtype == dtype and out.shape == x.shape
    expected = reference_experts(x, ids, weights, w13, w2)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=TOLERANCE[dtype] * scale)


def test_fused_experts_rejects_bad_input():
    x, ids, weights, w13, w2 = expert_case(torch.float32, 4, 8, 2, 32, 16, 0)
    with pytest.raises(RuntimeError, match="stored transposed per expert"):
        torch.ops.bisllm_cpu.fused_experts(x, ids, weights, w13, w2)
    w13t, w2t = transposed_storage(w13), transposed_storage(w2)
    bad_ids = ids.clone()
    bad_ids[2, 1] = 8
    with pytest.raises(RuntimeError, match=r"expert id 8 is outside \[0, 8\)"):
        torch.ops.bisllm_cpu.fused_experts(x, bad_ids, weights, w13t, w2t)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.bisllm_cpu.fused_experts(x.double(), ids, weights, w13t, w2t)


def test_experts_backend_uses_kernel_small_and_pytorch_large():
    x, ids, weights, w13, w2 = expert_case(torch.float32, 40, 16, 4, 48, 24, 3)
    backend = CpuExpertsBackend(max_pairs=64)
    w13t, w2t = backend.prepare_weights(w13, w2)
    assert torch.equal(w13t, w13) and torch.equal(w2t, w2)  # same values, new layout
    assert w13t.transpose(1, 2).is_contiguous() and w2t.transpose(1, 2).is_contiguous()
    expected = reference_experts(x, ids, weights, w13, w2)
    # 16 tokens x 4 = 64 pairs: the kernel; 40 x 4 = 160: PyTorch on the re-laid-out weights.
    for rows in (16, 40):
        out = backend.forward(x[:rows], ids[:rows], weights[:rows], w13t, w2t)
        torch.testing.assert_close(out, expected[:rows], rtol=0, atol=1e-5)


def test_attention_backend_decode_and_prefill_steps():
    """A prefill step goes through SDPA, the following decode step through the kernel; both
    write the pool and agree with attention recomputed from scratch."""
    num_heads, num_kv_heads, head_dim, page = 4, 2, 32, 4
    k_buffers = [torch.zeros(64, num_kv_heads, head_dim)]
    v_buffers = [torch.zeros(64, num_kv_heads, head_dim)]
    backend = CpuAttentionBackend(k_buffers, v_buffers)
    gen = torch.Generator().manual_seed(5)
    lens = [6, 3]
    # Sequence 0 owns pages 2, 5; sequence 1 owns page 9.
    pages = [[2, 5], [9]]

    def slots_of(seq: int, positions: range) -> list[int]:
        return [pages[seq][p // page] * page + p % page for p in positions]

    def step(query_lens: list[int], kv_lens: list[int]) -> torch.Tensor:
        width = max(kv_lens)
        kv_slots = torch.zeros(len(kv_lens), width, dtype=torch.int64)
        out_slots = []
        for seq, (q_len, kv_len) in enumerate(zip(query_lens, kv_lens, strict=True)):
            kv_slots[seq, :kv_len] = torch.tensor(slots_of(seq, range(kv_len)))
            out_slots += slots_of(seq, range(kv_len - q_len, kv_len))
        total = sum(query_lens)
        batch = ForwardBatch(
            input_ids=torch.zeros(total, dtype=torch.int64),
            positions=torch.zeros(total, dtype=torch.int64),
            out_slots=torch.tensor(out_slots),
            query_lens=query_lens,
            kv_lens=kv_lens,
            kv_slots=kv_slots,
            logits_indices=torch.zeros(1, dtype=torch.int64),
        )
        backend.begin(batch)
        q = torch.randn(total, num_heads, head_dim, generator=gen)
        k = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        out = backend.forward(0, q, k, v, 0.25)
        # From scratch: each new token attends to its sequence's pool rows up to itself.
        row = 0
        for seq, (q_len, kv_len) in enumerate(zip(query_lens, kv_lens, strict=True)):
            context = torch.tensor(slots_of(seq, range(kv_len)))
            keys = k_buffers[0][context].transpose(0, 1).repeat_interleave(2, 0)
            values = v_buffers[0][context].transpose(0, 1).repeat_interleave(2, 0)
            for i in range(q_len):
                visible = kv_len - q_len + i + 1
                expected = F.scaled_dot_product_attention(
                    q[row][:, None], keys[:, :visible], values[:, :visible], scale=0.25
                )[:, 0]
                torch.testing.assert_close(out[row], expected, rtol=0, atol=2e-6)
                row += 1
        return out

    step(query_lens=lens, kv_lens=lens)  # prefill both
    step(query_lens=[1, 1], kv_lens=[7, 4])  # decode: the kernel path
    assert backend._decode is not None
