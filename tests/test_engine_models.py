"""Engine models vs transformers on tiny random checkpoints of every supported family."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_checkpoints import VARIANTS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bisllm_server.engine.attention import TorchAttentionBackend
from bisllm_server.engine.forward_batch import ForwardBatch
from bisllm_server.engine.kv_cache import KVPool
from bisllm_server.engine.layers.mlp import clamped_swiglu
from bisllm_server.engine.layers.moe import TorchExpertsBackend, softmax_topk
from bisllm_server.engine.layers.rotary import compute_inv_freq, rope_parameters
from bisllm_server.engine.loader import LoadedModel, load_model
from bisllm_server.engine.models import (
    CheckpointMismatchError,
    UnsupportedModelError,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILY_VARIANTS = ["qwen3_moe", "mixtral", "llama", "glm4_moe", "deepseek_v3", "gpt_oss", "llama4"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="session")
def engine_model(checkpoint: Callable[[str], Path]) -> Callable[[str], LoadedModel]:
    loaded: dict[str, LoadedModel] = {}

    def get(variant: str) -> LoadedModel:
        if variant not in loaded:
            loaded[variant] = load_model(checkpoint(variant))
        return loaded[variant]

    return get


class Driver:
    """Runs an engine model over KV buffers it owns, the way a model runner would."""

    def __init__(self, loaded: LoadedModel, num_slots: int = 256) -> None:
        cfg = loaded.config
        self.model = loaded.model
        # Pages of one slot: the driver addresses slots directly.
        pool = KVPool(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            num_slots,
            1,
            cfg.dtype,
            "cpu",
            v_head_dim=cfg.kv_value_dim,
            shared_kv=cfg.kv_shared,
        )
        self.k, self.v = pool.k_buffers, pool.v_buffers
        self.attn = TorchAttentionBackend(self.k, self.v)

    def step(
        self, seqs: list[tuple[list[int], list[int]]], all_logits: bool = True
    ) -> torch.Tensor:
        """seqs: (new token ids, KV slot of every context position incl. the new ones).

        Returns logits for every new token (all_logits) or the last token of each sequence."""
        kv_lens = [len(slots) for _, slots in seqs]
        query_lens = [len(ids) for ids, _ in seqs]
        positions, out_slots, logits_rows = [], [], []
        kv_slots = torch.zeros(len(seqs), max(kv_lens), dtype=torch.int64)
        row = 0
        for i, ((ids, slots), kv_len) in enumerate(zip(seqs, kv_lens, strict=True)):
            start = kv_len - len(ids)
            positions += range(start, kv_len)
            out_slots += slots[start:]
            kv_slots[i, :kv_len] = torch.tensor(slots)
            logits_rows += range(row, row + len(ids)) if all_logits else [row + len(ids) - 1]
            row += len(ids)
        batch = ForwardBatch(
            input_ids=torch.tensor([t for ids, _ in seqs for t in ids]),
            positions=torch.tensor(positions),
            out_slots=torch.tensor(out_slots),
            query_lens=query_lens,
            kv_lens=kv_lens,
            kv_slots=kv_slots,
            logits_indices=torch.tensor(logits_rows),
        )
        self.attn.begin(batch)
        return self.model(batch, self.attn)

    def greedy(self, prompt: list[int], max_new_tokens: int, banned: list[int]) -> list[int]:
        """Batch-1 greedy decoding with `banned` tokens never picked; slot = position."""
        tokens = list(prompt)
        logits = self.step([(tokens, list(range(len(tokens))))], all_logits=False)
        out: list[int] = []
        while True:
            logits[:, banned] = float("-inf")
            token = int(logits[-1].argmax())
            out.append(token)
            tokens.append(token)
            if len(out) == max_new_tokens:
                return out
            logits = self.step([([token], list(range(len(tokens))))])


def prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (length,), generator=gen).tolist()


# (a) prefill logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_logits_match_transformers(variant, engine_model, hf_model):
    loaded, ref = engine_model(variant), hf_model(variant)
    for length in (1, 6, 23, 70):
        ids = prompt(length, seed=length)
        ours = Driver(loaded).step([(ids, list(range(length)))])
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0]
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape
        assert rel_err(ours, theirs) <= 1e-4, (variant, length)


# (b) greedy generation ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_64_tokens_match_generate(variant, engine_model, hf_model):
    loaded, ref = engine_model(variant), hf_model(variant)
    ids = prompt(9, seed=123)
    with torch.no_grad():
        generated = ref.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            do_sample=False,
            max_new_tokens=64,
            min_new_tokens=64,  # masks EOS, so all 64 tokens are compared
        )
    theirs = generated[0, len(ids) :].tolist()
    ours = Driver(loaded).greedy(ids, 64, banned=loaded.config.eos_token_ids)
    assert len(theirs) == 64
    assert ours == theirs


# (c) mixed batch == separate runs -----------------------------------------------------------


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_mixed_batch_matches_separate_runs(variant, engine_model):
    loaded = engine_model(variant)
    # (cached prefix, new tokens): a chunked-prefill continuation, a decode step, a fresh prompt.
    seqs = [(prompt(6, 1), prompt(3, 2)), (prompt(11, 3), prompt(1, 4)), ([], prompt(5, 5))]

    separate = []
    for cached, new in seqs:
        driver = Driver(loaded)
        if cached:
            driver.step([(cached, list(range(len(cached))))])
        context = list(range(len(cached) + len(new)))
        separate.append(driver.step([(new, context)]))
    expected = torch.cat(separate)

    # Same sequences in one batch, their KV scattered over shuffled, interleaved slots.
    driver = Driver(loaded)
    free = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist()
    slots = [[free.pop() for _ in range(len(c) + len(n))] for c, n in seqs]
    driver.step([(c, s[: len(c)]) for (c, _), s in zip(seqs, slots, strict=True) if c])
    got = driver.step([(n, s) for (_, n), s in zip(seqs, slots, strict=True)])
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


# (d) loader errors ----------------------------------------------------------------------------


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_lists_supported_ones(checkpoint, tmp_path):
    path = _copy_checkpoint(checkpoint("llama"), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["JambaForCausalLM"], model_type="jamba")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as err:
        load_model(path)
    message = str(err.value)
    assert "JambaForCausalLM" in message
    for supported in ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM"):
        assert supported in message
    assert isinstance(err.value, ValueError)


def test_architecture_falls_back_to_model_type(checkpoint, tmp_path):
    path = _copy_checkpoint(checkpoint("mixtral"), tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    assert load_model(path).config.architecture == "MixtralForCausalLM"


@pytest.mark.parametrize(
    ("variant", "dropped", "named"),
    [
        ("qwen3_moe", "model.layers.0.self_attn.k_proj.weight", "missing k_proj"),
        ("qwen3_moe", "model.layers.2.mlp.experts.5.up_proj.weight", "missing 5.up_proj"),
        ("mixtral", "model.layers.1.block_sparse_moe.gate.weight", "layers.1.mlp.gate.weight"),
        ("llama", "model.norm.weight", "model.norm.weight"),
    ],
)
def test_missing_weight_is_named(variant, dropped, named, checkpoint, tmp_path):
    tensors = load_file(checkpoint(variant) / "model.safetensors")
    del tensors[dropped]
    path = _copy_checkpoint(checkpoint(variant), tmp_path / "ckpt")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="missing weights") as err:
        load_model(path)
    assert named in str(err.value)


def test_unknown_tensor_is_named(checkpoint, tmp_path):
    tensors = load_file(checkpoint("llama") / "model.safetensors")
    tensors["model.layers.0.self_attn.sinks"] = torch.zeros(4)
    path = _copy_checkpoint(checkpoint("llama"), tmp_path / "ckpt")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.self_attn\.sinks"):
        load_model(path)


def test_bad_dtype_and_missing_files(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="int8") as err:
        load_model(checkpoint("llama"), dtype="int8")
    assert "bfloat16" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((checkpoint("llama") / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral"])
def test_fused_expert_names_load(variant, engine_model, hf_model, tmp_path):
    """transformers' fused in-memory names (save_original_format off) load to the same model."""
    hf_model(variant).save_pretrained(tmp_path, save_original_format=False)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # noqa: SIM118
    ours = dict(load_model(tmp_path).model.named_parameters())
    for name, param in engine_model(variant).model.named_parameters():
        assert torch.equal(ours[name], param), name


def test_model_config_fields(engine_model):
    cfg = engine_model("qwen3_moe").config
    assert (cfg.architecture, cfg.model_type) == ("Qwen3MoeForCausalLM", "qwen3_moe")
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.num_kv_heads) == (3, 4, 2)
    assert (cfg.head_dim, cfg.hidden_size, cfg.vocab_size) == (32, 64, 320)
    assert (cfg.eos_token_ids, cfg.bos_token_id, cfg.dtype) == ([0], 1, torch.float32)


# (e) bf16 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_bf16_load_close_to_fp32(variant, checkpoint, engine_model):
    loaded = load_model(checkpoint(variant), dtype="bf16")
    assert loaded.config.dtype == torch.bfloat16
    # Everything is bf16 but what transformers keeps in fp32: the sigmoid routers' weight and
    # bias (GLM, DeepSeek) and GPT-OSS's norms.
    for name, param in loaded.model.named_parameters():
        router = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        norm = name.endswith("layernorm.weight") or name == "model.norm.weight"
        fp32 = (router and variant in ("glm4_moe", "deepseek_v3")) or (
            norm and variant == "gpt_oss"
        )
        assert param.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    ids = prompt(20, seed=7)
    ours = Driver(loaded).step([(ids, list(range(20)))])
    ref = Driver(engine_model(variant)).step([(ids, list(range(20)))])
    assert ours.dtype == torch.float32
    row_err = (ours - ref).abs().amax(-1) / ref.abs().max()
    # bf16 rounding can flip a token's expert choice (transformers' bf16 run flips the same
    # token here), so single rows get a loose bound and the typical row a tight one. With
    # Llama 4's single expert per token a flip swaps the whole routed output (transformers'
    # bf16 row there: 0.185).
    assert row_err.max() <= (0.25 if variant == "llama4" else 0.15)
    assert row_err.median() <= 0.03


# (f) MoE experts backend and router ---------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "experts", "max_waste", "one_hot_max"),
    [
        (37, 8, 4.0, 1 << 16),
        (37, 8, 2.0, 1 << 16),
        (37, 8, 2.0, 0),
        (37, 8, 0.0, 1 << 16),
        (2, 16, 4.0, 1 << 16),
    ],
    ids=["dense", "padded", "padded_sorted_ranks", "grouped", "gathered"],
)
@pytest.mark.parametrize("gpt_oss_style", [False, True], ids=["swiglu", "biased_clamped"])
def test_torch_experts_backend_matches_naive_reference(
    tokens, experts, max_waste, one_hot_max, gpt_oss_style
):
    """Every grouping strategy against a per-(token, slot) loop; `gpt_oss_style` adds expert
    biases and the clamped SwiGLU (limit 0.5, so the clamps bind)."""
    gen = torch.Generator().manual_seed(0)
    hidden, inter, top_k = 24, 16, 3
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    b13 = torch.randn(experts, 2 * inter, generator=gen) if gpt_oss_style else None
    b2 = torch.randn(experts, hidden, generator=gen) if gpt_oss_style else None
    weights, ids = softmax_topk(torch.randn(tokens, experts, generator=gen), top_k, True)
    ids[0] = torch.tensor([7, 6, 5])  # experts 0..4 unused by token 0; some expert may be idle

    def expert(e: int, v: torch.Tensor) -> torch.Tensor:
        gate, up = (w13[e] @ v + (0 if b13 is None else b13[e])).chunk(2)
        if not gpt_oss_style:
            return w2[e] @ (torch.nn.functional.silu(gate) * up)
        gate, up = gate.clamp(max=0.5), up.clamp(-0.5, 0.5)
        return w2[e] @ ((up + 1) * gate * torch.sigmoid(1.702 * gate)) + b2[e]

    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            expected[t] += weights[t, j] * expert(int(ids[t, j]), x[t])
    backend = TorchExpertsBackend(max_waste, one_hot_max=one_hot_max)
    extra = {}
    if gpt_oss_style:
        act = functools.partial(clamped_swiglu, alpha=1.702, limit=0.5)
        extra = dict(b13=b13, b2=b2, activation=act)
    got = backend.forward(x, ids, weights, w13, w2, **extra)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    empty = backend.forward(x[:0], ids[:0], weights[:0], w13, w2, **extra)
    assert empty.shape == (0, hidden)


def test_softmax_topk_renormalisation():
    logits = torch.randn(5, 8, dtype=torch.bfloat16)
    weights, ids = softmax_topk(logits, 2, renormalize=True)
    assert weights.dtype == torch.bfloat16 and ids.shape == (5, 2)
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(5), atol=1e-2, rtol=0)
    raw, _ = softmax_topk(logits, 2, renormalize=False)
    assert (raw.float().sum(-1) < 1).all()


# attention backend and rotary, against straightforward references ---------------------------


# Per-layer restrictions (attention.py): none, a sliding window, chunks, sinks, window + sinks.
RESTRICTIONS = {
    "causal": {},
    "window4": dict(sliding_window=4),
    "chunks5": dict(chunk_size=5),
    "sinks": dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "window3_sinks": dict(sliding_window=3, sinks=torch.tensor([1.5, 0.3, -0.7, 3.0])),
}


@pytest.mark.parametrize("restriction", list(RESTRICTIONS))
@pytest.mark.parametrize("backend_cls", ["torch", "cpu_kernels"])
def test_attention_backend_matches_naive_causal_attention(backend_cls, restriction):
    from bisllm_server.engine import cpu_kernels
    from bisllm_server.engine.cpu_kernels.backends import CpuAttentionBackend

    if backend_cls == "cpu_kernels":
        assert cpu_kernels.available(), cpu_kernels.failure()
    extra = RESTRICTIONS[restriction]
    window, chunk, sinks = (extra.get(k) for k in ("sliding_window", "chunk_size", "sinks"))
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, slots = 4, 2, 8, 64
    k_buf, v_buf = torch.zeros(slots, kv_heads, dim), torch.zeros(slots, kv_heads, dim)
    backend = TorchAttentionBackend if backend_cls == "torch" else CpuAttentionBackend
    attn = backend([k_buf], [v_buf])
    free = torch.randperm(slots, generator=gen).tolist()
    contexts = {s: [free.pop() for _ in range(n)] for s, n in enumerate([7, 3, 12])}
    keys = {s: torch.randn(len(c), kv_heads, dim, generator=gen) for s, c in contexts.items()}
    vals = {s: torch.randn(len(c), kv_heads, dim, generator=gen) for s, c in contexts.items()}

    def run(query_lens: list[int]) -> None:
        """One step where sequence s adds its last query_lens[s] positions; checks outputs."""
        kv_lens = [len(c) for c in contexts.values()]
        q = {s: torch.randn(n, heads, dim, generator=gen) for s, n in enumerate(query_lens)}
        news = [range(kv - n, kv) for kv, n in zip(kv_lens, query_lens, strict=True)]
        kv_slots = torch.zeros(3, max(kv_lens), dtype=torch.int64)
        for s, c in contexts.items():
            kv_slots[s, : len(c)] = torch.tensor(c)
        batch = ForwardBatch(
            input_ids=torch.zeros(sum(query_lens), dtype=torch.int64),
            positions=torch.tensor([p for r in news for p in r]),
            out_slots=torch.tensor([contexts[s][p] for s, r in enumerate(news) for p in r]),
            query_lens=query_lens,
            kv_lens=kv_lens,
            kv_slots=kv_slots,
            logits_indices=torch.zeros(0, dtype=torch.int64),
        )
        attn.begin(batch)
        out = attn.forward(
            0,
            torch.cat(list(q.values())),
            torch.cat([keys[s][list(r)] for s, r in enumerate(news)]),
            torch.cat([vals[s][list(r)] for s, r in enumerate(news)]),
            scale=0.3,
            **extra,
        )
        assert not out.isnan().any()
        expected = []
        for s, r in enumerate(news):
            k = keys[s].repeat_interleave(heads // kv_heads, dim=1)
            v = vals[s].repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[s], k) * 0.3
            key_pos, query_pos = torch.arange(len(contexts[s]))[None, :], torch.tensor(list(r))
            hidden = key_pos > query_pos[:, None]
            if window is not None:
                hidden |= key_pos <= query_pos[:, None] - window
            if chunk is not None:
                hidden |= key_pos // chunk != query_pos[:, None] // chunk
            scores = scores.masked_fill(hidden, float("-inf"))
            if sinks is None:
                probs = scores.softmax(-1)
            else:  # exp(sink) joins the denominator only
                sink = sinks[:, None, None].expand(-1, scores.shape[1], 1)
                probs = torch.cat((scores, sink), -1).softmax(-1)[..., :-1]
            expected.append(torch.einsum("hqk,khd->qhd", probs, v))
        torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)

    run([7, 3, 12])  # prefill of unequal lengths (padded queries)
    run([2, 1, 5])  # mixed chunk / decode
    run([1, 1, 1])  # pure decode, unequal context lengths
    contexts[1] += [free.pop() for _ in range(9)]  # now all three contexts have 12 tokens
    contexts[0] += [free.pop() for _ in range(5)]
    keys = {s: torch.randn(12, kv_heads, dim, generator=gen) for s in contexts}
    vals = {s: torch.randn(12, kv_heads, dim, generator=gen) for s in contexts}
    run([12, 12, 12])  # equal-length prefill: no padding
    run([1, 1, 1])  # decode fast path: no padding and no mask


ROPE_CASES = {
    "default": dict(rope_parameters=dict(rope_type="default", rope_theta=10_000.0)),
    "linear": dict(rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=4.0)),
    "llama3": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500_000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        )
    ),
    "yarn": dict(
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10_000.0, factor=8.0, original_max_position_embeddings=256
        )
    ),
    "yarn_mscale_no_truncate": dict(
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150_000.0,
            factor=32.0,
            original_max_position_embeddings=64,
            beta_fast=16.0,
            beta_slow=2.0,
            mscale=1.0,
            mscale_all_dim=0.5,
            truncate=False,
        )
    ),
    "legacy_rope_scaling": dict(
        rope_theta=40_000.0,
        rope_scaling=dict(type="yarn", factor=4.0),
        max_position_embeddings=1024,
    ),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_frequencies_match_transformers(case):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = dict(hidden_size=256, num_attention_heads=4, max_position_embeddings=2048)
    kwargs.update(ROPE_CASES[case])
    config = LlamaConfig(**kwargs)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[rope_type](config)
    # Parse what a config.json would hold: the raw kwargs (legacy form) and the saved dict.
    for raw in (kwargs, config.to_dict()):
        params = rope_parameters(raw)
        got, got_factor = compute_inv_freq(params, 64, raw["max_position_embeddings"])
        assert torch.equal(got, expected), case
        assert got_factor == pytest.approx(factor, rel=1e-12), case
