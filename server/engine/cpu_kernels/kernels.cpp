// CPU kernels for the two decode hot paths that eager PyTorch runs as dozens of small ops:
//
//   bisllm_cpu::decode_attention  one query token per sequence, read straight from the paged
//                                 KV pool through each sequence's slot list (no gathered copy,
//                                 no mask, no padding);
//   bisllm_cpu::fused_experts     routed SwiGLU experts for a small batch: each expert reads its
//                                 weights once and applies them to exactly its own tokens (no
//                                 padding to the busiest expert, no per-expert op dispatch).
//
// Both accumulate in fp32 whatever the storage dtype and round once on output. They are
// registered with the dispatcher (torch.ops.bisllm_cpu.*), built on first use by
// bisllm_server.engine.cpu_kernels, and run on torch's intra-op thread pool.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Widen n values to fp32. The bf16 case is a 16-bit shift the compiler vectorises.
#define BISLLM_INLINE inline __attribute__((always_inline))

template <typename T>
BISLLM_INLINE void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
BISLLM_INLINE void widen<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* raw = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(raw[i]) << 16);
}

#if defined(__AVX512F__)
// 16 values at w (only the lanes in `mask`), widened to fp32.
template <typename scalar_t>
BISLLM_INLINE __m512 load16(const scalar_t* w, __mmask16 mask);

template <>
BISLLM_INLINE __m512 load16<float>(const float* w, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, w);
}

template <>
BISLLM_INLINE __m512 load16<c10::BFloat16>(const c10::BFloat16* w, __mmask16 mask) {
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <>
BISLLM_INLINE __m512 load16<c10::Half>(const c10::Half* w, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w));
}

#endif

// e^x to ~2 ulp for x <= 88: exponent/mantissa split with a degree-6 polynomial on
// [-ln2/2, ln2/2]. Branch-free, so `omp simd` loops over it vectorise (std::exp does not).
BISLLM_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// s[i] = e^(s[i] - max(s)) in place; returns 1 / sum of the new values (softmax = s * that).
inline float exp_shifted(float* s, int64_t n) {
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) peak = std::max(peak, s[i]);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    s[i] = fast_exp(s[i] - peak);
    total += s[i];
  }
  return 1.f / total;
}

BISLLM_INLINE float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

BISLLM_INLINE void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// ---------------------------------------------------------------------------------------------
// Decode attention over the paged pool.

// Pointers and strides of one decode_attention call, shared by its kernels.
template <typename scalar_t>
struct DecodeAttentionView {
  DecodeAttentionView(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                      const at::Tensor& kv_slots, const at::Tensor& lens, double softmax_scale,
                      at::Tensor& out)
      : num_seqs(q.size(0)),
        num_heads(q.size(1)),
        head_dim(q.size(2)),
        num_kv_heads(k_buf.size(1)),
        group(num_heads / num_kv_heads),
        max_kv(kv_slots.size(1)),
        scale(static_cast<float>(softmax_scale)),
        slots(kv_slots.const_data_ptr<int64_t>()),
        kv_lens(lens.const_data_ptr<int64_t>()),
        q_ptr(q.const_data_ptr<scalar_t>()),
        k_ptr(k_buf.const_data_ptr<scalar_t>()),
        v_ptr(v_buf.const_data_ptr<scalar_t>()),
        out_ptr(out.data_ptr<scalar_t>()),
        q_strides{q.stride(0), q.stride(1)},
        k_strides{k_buf.stride(0), k_buf.stride(1)},
        v_strides{v_buf.stride(0), v_buf.stride(1)} {}

  // One work item per (sequence, KV head): its query-head group shares every K/V row read.
  int64_t num_items() const { return num_seqs * num_kv_heads; }
  const scalar_t* query(int64_t seq, int64_t head) const {
    return q_ptr + seq * q_strides[0] + head * q_strides[1];
  }
  const scalar_t* key(int64_t slot, int64_t kv_head) const {
    return k_ptr + slot * k_strides[0] + kv_head * k_strides[1];
  }
  const scalar_t* value(int64_t slot, int64_t kv_head) const {
    return v_ptr + slot * v_strides[0] + kv_head * v_strides[1];
  }
  scalar_t* output(int64_t seq, int64_t head) const {
    return out_ptr + (seq * num_heads + head) * head_dim;
  }

  const int64_t num_seqs, num_heads, head_dim, num_kv_heads, group, max_kv;
  const float scale;
  const int64_t* slots;    // [num_seqs, max_kv]
  const int64_t* kv_lens;  // [num_seqs]
  const scalar_t* q_ptr;
  const scalar_t* k_ptr;
  const scalar_t* v_ptr;
  scalar_t* out_ptr;
  const int64_t q_strides[2], k_strides[2], v_strides[2];
};

// kHeadDim > 0 fixes head_dim at compile time, so the per-position loops (a few vectors
// long) are fully unrolled; loop set-up costs more than the arithmetic at these lengths.
template <typename scalar_t, int64_t kHeadDim>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                             const at::Tensor& kv_slots, const at::Tensor& kv_lens, double scale,
                             at::Tensor& out) {
  const DecodeAttentionView<scalar_t> a(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : a.head_dim;
  const int64_t group = a.group, max_kv = a.max_kv;

  at::parallel_for(0, a.num_items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(group * head_dim), scores(group * max_kv), acc(group * head_dim);
    std::vector<float> row(head_dim), inv_sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / a.num_kv_heads, kv_head = item % a.num_kv_heads;
      const int64_t kv_len = a.kv_lens[seq];
      const int64_t* slots = a.slots + seq * max_kv;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* src = a.query(seq, kv_head * group + g);
        widen(src, queries.data() + g * head_dim, head_dim);
      }
      for (int64_t pos = 0; pos < kv_len; ++pos) {
        widen(a.key(slots[pos], kv_head), row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g)
          scores[g * max_kv + pos] =
              dot(queries.data() + g * head_dim, row.data(), head_dim) * a.scale;
      }
      for (int64_t g = 0; g < group; ++g) inv_sum[g] = exp_shifted(scores.data() + g * max_kv, kv_len);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < kv_len; ++pos) {
        widen(a.value(slots[pos], kv_head), row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g)
          axpy(scores[g * max_kv + pos], row.data(), acc.data() + g * head_dim, head_dim);
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* dst = a.output(seq, kv_head * group + g);
        const float* src = acc.data() + g * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<scalar_t>(src[d] * inv_sum[g]);
      }
    }
  });
}

#if defined(__AVX512F__)
// The same computation with each K/V row held in registers (kHeadDim / 16 vectors), for the
// head sizes that are whole vectors; scores and accumulators stay in L1-resident buffers.
template <typename scalar_t, int64_t kHeadDim>
void decode_attention_avx512(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                             const at::Tensor& kv_slots, const at::Tensor& kv_lens, double scale,
                             at::Tensor& out) {
  static_assert(kHeadDim % 16 == 0 && kHeadDim <= 256, "head_dim must be whole vectors");
  constexpr int64_t kVectors = kHeadDim / 16;
  const DecodeAttentionView<scalar_t> a(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
  const int64_t group = a.group, max_kv = a.max_kv;
  constexpr __mmask16 kAll = 0xFFFF;

  at::parallel_for(0, a.num_items(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(group * kHeadDim), scores(group * max_kv), acc(group * kHeadDim);
    std::vector<float> inv_sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / a.num_kv_heads, kv_head = item % a.num_kv_heads;
      const int64_t kv_len = a.kv_lens[seq];
      const int64_t* slots = a.slots + seq * max_kv;
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* src = a.query(seq, kv_head * group + g);
        for (int64_t v = 0; v < kVectors; ++v)
          _mm512_storeu_ps(queries.data() + g * kHeadDim + 16 * v,
                           _mm512_mul_ps(load16(src + 16 * v, kAll), _mm512_set1_ps(a.scale)));
      }
      for (int64_t pos = 0; pos < kv_len; ++pos) {
        const scalar_t* key = a.key(slots[pos], kv_head);
        __m512 row[kVectors];
        for (int64_t v = 0; v < kVectors; ++v) row[v] = load16(key + 16 * v, kAll);
        for (int64_t g = 0; g < group; ++g) {
          const float* query = queries.data() + g * kHeadDim;
          __m512 sum = _mm512_mul_ps(row[0], _mm512_loadu_ps(query));
          for (int64_t v = 1; v < kVectors; ++v)
            sum = _mm512_fmadd_ps(row[v], _mm512_loadu_ps(query + 16 * v), sum);
          scores[g * max_kv + pos] = _mm512_reduce_add_ps(sum);
        }
      }
      for (int64_t g = 0; g < group; ++g) inv_sum[g] = exp_shifted(scores.data() + g * max_kv, kv_len);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < kv_len; ++pos) {
        const scalar_t* value = a.value(slots[pos], kv_head);
        __m512 row[kVectors];
        for (int64_t v = 0; v < kVectors; ++v) row[v] = load16(value + 16 * v, kAll);
        for (int64_t g = 0; g < group; ++g) {
          const __m512 weight = _mm512_set1_ps(scores[g * max_kv + pos]);
          float* sum = acc.data() + g * kHeadDim;
          for (int64_t v = 0; v < kVectors; ++v)
            _mm512_storeu_ps(sum + 16 * v, _mm512_fmadd_ps(weight, row[v], _mm512_loadu_ps(sum + 16 * v)));
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* dst = a.output(seq, kv_head * group + g);
        const float* src = acc.data() + g * kHeadDim;
        for (int64_t d = 0; d < kHeadDim; ++d) dst[d] = static_cast<scalar_t>(src[d] * inv_sum[g]);
      }
    }
  });
}
#endif

// Head sizes with an unrolled kernel; others take the generic loop.
template <typename scalar_t, int64_t kHeadDim>
void decode_attention_fixed(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                            const at::Tensor& kv_slots, const at::Tensor& kv_lens, double scale,
                            at::Tensor& out) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<scalar_t, double>) {
    decode_attention_avx512<scalar_t, kHeadDim>(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
    return;
  }
#endif
  decode_attention_kernel<scalar_t, kHeadDim>(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                            const at::Tensor& kv_slots, const at::Tensor& kv_lens, double scale) {
  check_cpu(q, "q");
  check_cpu(k_buf, "k_buf");
  check_cpu(v_buf, "v_buf");
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3,
              "q, k_buf and v_buf must be [tokens or slots, heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == k_buf.scalar_type() && q.scalar_type() == v_buf.scalar_type(),
              "q, k_buf and v_buf must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_buf.stride(2) == 1 && v_buf.stride(2) == 1,
              "the head_dim axis must be contiguous");
  TORCH_CHECK(k_buf.sizes() == v_buf.sizes(), "k_buf and v_buf must have the same shape");
  TORCH_CHECK(q.size(2) == k_buf.size(2), "q and the KV pool must share head_dim");
  TORCH_CHECK(q.size(1) % k_buf.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(kv_slots.dim() == 2 && kv_slots.size(0) == q.size(0) &&
                  kv_slots.scalar_type() == at::kLong && kv_slots.is_contiguous(),
              "kv_slots must be a contiguous int64 [num_seqs, max_kv] tensor");
  TORCH_CHECK(kv_lens.dim() == 1 && kv_lens.size(0) == q.size(0) &&
                  kv_lens.scalar_type() == at::kLong && kv_lens.is_contiguous(),
              "kv_lens must be a contiguous int64 [num_seqs] tensor");
  const auto* lens = kv_lens.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < kv_lens.size(0); ++i)
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= kv_slots.size(1), "kv_lens[", i, "] = ", lens[i],
                " is outside [1, ", kv_slots.size(1), "]");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    switch (q.size(2)) {
      case 32:
        decode_attention_fixed<scalar_t, 32>(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
        break;
      case 64:
        decode_attention_fixed<scalar_t, 64>(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
        break;
      case 128:
        decode_attention_fixed<scalar_t, 128>(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
        break;
      default:
        decode_attention_kernel<scalar_t, 0>(q, k_buf, v_buf, kv_slots, kv_lens, scale, out);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Routed SwiGLU experts for small batches.
//
// The weights must be stored transposed per expert (w13 as [E, H, 2I] in memory, w2 as
// [E, I, H]; the tensors keep their logical shapes [E, 2I, H] and [E, H, I]), which
// CpuExpertsBackend.prepare_weights arranges once. Then every product below is
// "rows of activations times a row-major weight panel", computed by `panel_gemm` with its
// accumulators in registers and each weight element widened once per 4 activation rows.

constexpr int64_t kRows = 4;   // activation rows per register tile
constexpr int64_t kCols = 16;  // output columns per register tile (one 512-bit vector of fp32)

// out[r][c] = sum_k in[r][k] * w[k][c] for r < rows, c < cols. `in` is [ceil(rows/kRows)*kRows, K]
// with zero rows as padding; w is row-major [K, cols] in storage dtype; out is [rows, cols].
template <typename scalar_t>
void panel_gemm_portable(const float* in, int64_t rows, int64_t depth, const scalar_t* w,
                         int64_t cols, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const float* a = in + r0 * depth;
    for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
      const int64_t width = std::min(kCols, cols - c0);
      float acc[kRows][kCols] = {};
      float panel[kCols] = {};
      for (int64_t k = 0; k < depth; ++k) {
        widen(w + k * cols + c0, panel, width);  // a tail's unused lanes stay zero
        for (int64_t r = 0; r < kRows; ++r) {
          const float scale = a[r * depth + k];
#pragma omp simd
          for (int64_t c = 0; c < kCols; ++c) acc[r][c] += scale * panel[c];
        }
      }
      for (int64_t r = 0; r < std::min(kRows, rows - r0); ++r)
        std::memcpy(out + (r0 + r) * cols + c0, acc[r], width * sizeof(float));
    }
  }
}

#if defined(__AVX512F__)
// The same product with the kRows x 16 accumulators pinned in registers.
template <typename scalar_t>
void panel_gemm(const float* in, int64_t rows, int64_t depth, const scalar_t* w, int64_t cols,
                float* out) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    panel_gemm_portable(in, rows, depth, w, cols, out);
  } else {
    static_assert(kRows == 4 && kCols == 16, "the register tile below is 4 x 16");
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const float* a = in + r0 * depth;
      for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
        const int64_t width = std::min(kCols, cols - c0);
        const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
        for (int64_t k = 0; k < depth; ++k) {
          const __m512 panel = load16(w + k * cols + c0, mask);
          acc0 = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), panel, acc0);
          acc1 = _mm512_fmadd_ps(_mm512_set1_ps(a[depth + k]), panel, acc1);
          acc2 = _mm512_fmadd_ps(_mm512_set1_ps(a[2 * depth + k]), panel, acc2);
          acc3 = _mm512_fmadd_ps(_mm512_set1_ps(a[3 * depth + k]), panel, acc3);
        }
        const __m512 accs[kRows] = {acc0, acc1, acc2, acc3};
        for (int64_t r = 0; r < std::min(kRows, rows - r0); ++r)
          _mm512_mask_storeu_ps(out + (r0 + r) * cols + c0, mask, accs[r]);
      }
    }
  }
}
#else
template <typename scalar_t>
void panel_gemm(const float* in, int64_t rows, int64_t depth, const scalar_t* w, int64_t cols,
                float* out) {
  panel_gemm_portable(in, rows, depth, w, cols, out);
}
#endif

template <typename scalar_t>
void fused_experts_kernel(const at::Tensor& x, const at::Tensor& topk_ids,
                          const at::Tensor& topk_weights, const at::Tensor& w13,
                          const at::Tensor& w2, at::Tensor& out) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1), top_k = topk_ids.size(1);
  const int64_t num_experts = w13.size(0), inter = w2.size(2);
  const int64_t num_pairs = num_tokens * top_k;
  const auto* ids = topk_ids.const_data_ptr<int64_t>();
  const auto* x_ptr = x.const_data_ptr<scalar_t>();
  const auto* w13_ptr = w13.const_data_ptr<scalar_t>();  // per expert [H, 2I] row-major
  const auto* w2_ptr = w2.const_data_ptr<scalar_t>();    // per expert [I, H] row-major
  auto* out_ptr = out.data_ptr<scalar_t>();
  const auto weights = topk_weights.to(at::kFloat).contiguous();
  const float* weight_ptr = weights.const_data_ptr<float>();

  // Pairs (token, slot) grouped by expert, in pair order within each expert.
  std::vector<int64_t> group_start(num_experts + 1, 0), pairs(num_pairs);
  for (int64_t p = 0; p < num_pairs; ++p) ++group_start[ids[p] + 1];
  for (int64_t e = 0; e < num_experts; ++e) group_start[e + 1] += group_start[e];
  {
    std::vector<int64_t> cursor(group_start.begin(), group_start.end() - 1);
    for (int64_t p = 0; p < num_pairs; ++p) pairs[cursor[ids[p]]++] = p;
  }

  // Each pair's weighted expert output, summed per token at the end: no two threads write the
  // same row, so experts run in parallel without atomics.
  std::vector<float> pair_out(num_pairs * hidden);
  at::parallel_for(0, num_experts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xs, gate_up, act, down;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t first = group_start[e], count = group_start[e + 1] - first;
      if (count == 0) continue;
      const int64_t padded = (count + kRows - 1) / kRows * kRows;
      xs.assign(padded * hidden, 0.f);
      act.assign(padded * inter, 0.f);
      gate_up.resize(count * 2 * inter);
      down.resize(count * hidden);
      for (int64_t i = 0; i < count; ++i)
        widen(x_ptr + (pairs[first + i] / top_k) * hidden, xs.data() + i * hidden, hidden);
      panel_gemm(xs.data(), count, hidden, w13_ptr + e * hidden * 2 * inter, 2 * inter,
                 gate_up.data());
      for (int64_t i = 0; i < count; ++i) {
        const float* gate = gate_up.data() + i * 2 * inter;
        const float* up = gate + inter;
        float* a = act.data() + i * inter;
#pragma omp simd
        for (int64_t j = 0; j < inter; ++j) a[j] = gate[j] / (1.f + fast_exp(-gate[j])) * up[j];
      }
      panel_gemm(act.data(), count, inter, w2_ptr + e * inter * hidden, hidden, down.data());
      for (int64_t i = 0; i < count; ++i) {
        const int64_t pair = pairs[first + i];
        const float weight = weight_ptr[pair];
        const float* src = down.data() + i * hidden;
        float* dst = pair_out.data() + pair * hidden;
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) dst[j] = weight * src[j];
      }
    }
  });

  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(hidden);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t k = 0; k < top_k; ++k)
        axpy(1.f, pair_out.data() + (t * top_k + k) * hidden, sum.data(), hidden);
      scalar_t* dst = out_ptr + t * hidden;
      for (int64_t d = 0; d < hidden; ++d) dst[d] = static_cast<scalar_t>(sum[d]);
    }
  });
}

// True when each expert's matrix is stored transposed and packed: logical [E, R, C] laid out
// as [E, C, R] row-major.
bool expert_transposed(const at::Tensor& w) {
  return w.stride(0) == w.size(1) * w.size(2) && w.stride(1) == 1 && w.stride(2) == w.size(1);
}

at::Tensor fused_experts(const at::Tensor& x, const at::Tensor& topk_ids,
                         const at::Tensor& topk_weights, const at::Tensor& w13,
                         const at::Tensor& w2) {
  check_cpu(x, "x");
  check_cpu(w13, "w13");
  check_cpu(w2, "w2");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [tokens, hidden] tensor");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "w13 must be [E, 2*I, H] and w2 [E, H, I]");
  TORCH_CHECK(expert_transposed(w13) && expert_transposed(w2),
              "w13 and w2 must be stored transposed per expert (see "
              "CpuExpertsBackend.prepare_weights)");
  TORCH_CHECK(x.scalar_type() == w13.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "x, w13 and w2 must share a dtype");
  TORCH_CHECK(w13.size(0) == w2.size(0) && w13.size(2) == x.size(1) && w2.size(1) == x.size(1) &&
                  w13.size(1) == 2 * w2.size(2),
              "expert weights do not match: w13 ", w13.sizes(), ", w2 ", w2.sizes(), ", x ",
              x.sizes());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) &&
                  topk_ids.scalar_type() == at::kLong && topk_ids.is_contiguous(),
              "topk_ids must be a contiguous int64 [tokens, k] tensor");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), "topk_weights must match topk_ids");
  const auto* ids = topk_ids.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < topk_ids.numel(); ++p)
    TORCH_CHECK(ids[p] >= 0 && ids[p] < w13.size(0), "expert id ", ids[p], " is outside [0, ",
                w13.size(0), ")");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_experts", [&] {
    fused_experts_kernel<scalar_t>(x, topk_ids, topk_weights, w13, w2, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(bisllm_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_buf, Tensor v_buf, Tensor kv_slots, Tensor kv_lens, "
      "float scale) -> Tensor");
  m.def(
      "fused_experts(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w2) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(bisllm_cpu, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("fused_experts", &fused_experts);
}
