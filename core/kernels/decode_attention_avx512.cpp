// One new query per row attending to a static cache, on CPUs with AVX-512: softmax(q kᵀ · scale + mask) v per
// query head, the keys and values of its KV head shared by the heads of its group (no copies per head). The heads of
// a group are computed together: each key and value is widened to float32 once for all of them, and each head's
// scores of 16 slots are summed across lanes in one shuffle network rather than one reduction per slot (SmolLM2's
// layer at batch 8, 9 heads on 3 KV heads, 64 slots filled: 27.2 -> 20.5 us a call against a head at a time).
//
// Everything is computed in float32 (bfloat16 inputs are widened exactly) and rounded to the inputs' dtype once, at
// the output. The mask is additive, as transformers builds it: a masked slot holds the dtype's minimum, and after
// the row's maximum is subtracted its weight is exactly 0.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "aoti_shim.h"

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxChunks = 8;    // head dims up to 128
constexpr int64_t kValueHeads = 4;   // heads whose weighted value sums are accumulated together

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 inline __m512 widened(const float* p) { return _mm512_loadu_ps(p); }

AVX512 inline __m512 widened(const c10::BFloat16* p) {
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

AVX512 inline void narrowed(float* p, __m512 values) { _mm512_storeu_ps(p, values); }

AVX512 inline void narrowed(c10::BFloat16* p, __m512 values) {
  // Round to nearest even, as torch's float -> bfloat16 conversion does (inputs here are finite).
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

// e^x for x <= 0 (scores minus their maximum): 2^n · p(r) with r = x − n ln 2, |r| <= ln 2 / 2, p the degree-6
// Taylor polynomial (relative error below 2e-7); below -87 (float32's smallest normal) the weight is 0.
AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __m512 floor = _mm512_set1_ps(-87.0f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, floor, _CMP_LT_OQ);
  x = _mm512_max_ps(x, floor);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(~underflow, p, n);
}

// One query head: `scores` is scratch of `padded` floats (slots rounded up to whole vectors).
template <typename T>
AVX512 void attend(const T* q, const T* k, const T* v, int64_t key_stride, int64_t value_stride, const T* mask,
                   int64_t slots, int64_t head_dim, int64_t value_dim, float scale, float* scores, int64_t padded,
                   T* out) {
  __m512 query[kMaxChunks];
  const int64_t chunks = head_dim / kLanes;
  for (int64_t c = 0; c < chunks; ++c) query[c] = _mm512_mul_ps(widened(q + c * kLanes), _mm512_set1_ps(scale));
  // A masked slot (the mask's dtype minimum) ends with weight exactly 0 once any slot is not masked, so its key is
  // not read; a row with every slot masked is scored in full, as the model's own attention scores it.
  const float masked = static_cast<float>(std::numeric_limits<T>::lowest());
  float maximum = -std::numeric_limits<float>::infinity();
  for (int pass = 0; pass < 2 && maximum == -std::numeric_limits<float>::infinity(); ++pass) {
    for (int64_t s = 0; s < slots; ++s) {
      const float bias = static_cast<float>(mask[s]);
      if (pass == 0 && bias == masked) {
        scores[s] = -std::numeric_limits<float>::infinity();
        continue;
      }
      const T* key = k + s * key_stride;
      __m512 dot = _mm512_mul_ps(query[0], widened(key));
      for (int64_t c = 1; c < chunks; ++c) dot = _mm512_fmadd_ps(query[c], widened(key + c * kLanes), dot);
      const float score = _mm512_reduce_add_ps(dot) + bias;
      scores[s] = score;
      maximum = std::max(maximum, score);
    }
  }
  for (int64_t s = slots; s < padded; ++s) scores[s] = -std::numeric_limits<float>::infinity();
  __m512 total = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(maximum);
  for (int64_t s = 0; s < padded; s += kLanes) {
    const __m512 weight = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + s), shift));
    _mm512_storeu_ps(scores + s, weight);
    total = _mm512_add_ps(total, weight);
  }
  const int64_t value_chunks = value_dim / kLanes;
  __m512 acc[kMaxChunks];
  for (int64_t c = 0; c < value_chunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t s = 0; s < slots; ++s) {
    if (scores[s] == 0.0f) continue;  // masked slots: most of a static cache early in a generation
    const __m512 weight = _mm512_set1_ps(scores[s]);
    const T* value = v + s * value_stride;
    for (int64_t c = 0; c < value_chunks; ++c) acc[c] = _mm512_fmadd_ps(weight, widened(value + c * kLanes), acc[c]);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t c = 0; c < value_chunks; ++c) narrowed(out + c * kLanes, _mm512_mul_ps(acc[c], inverse));
}

// Lane i of the result is the sum of the 16 lanes of `v[i]`: pairs, then quads within 128-bit lanes, then across them.
AVX512 inline __m512 lane_sums(const __m512 (&v)[kLanes]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Up to 16 consecutive values from `p` widened to float32 (`count` of them; the other lanes 0).
AVX512 inline __m512 widened_part(const float* p, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, p); }

AVX512 inline __m512 widened_part(const c10::BFloat16* p, __mmask16 lanes) {
  const __m256i halves = _mm256_maskz_loadu_epi16(lanes, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}

// Scratch of one thread for `attend_group`.
struct GroupScratch {
  std::vector<float> query, keys, scores, one_head, maximum, total;
  GroupScratch(int64_t heads, int64_t head_dim, int64_t padded)
      : query(heads * head_dim), keys(kLanes * head_dim), scores(heads * padded), one_head(padded), maximum(heads),
        total(heads) {}
};

// Softmax weights (`scratch.scores`, unnormalized) times values for `Heads` heads of a group, divided by their totals;
// slots every one of these heads weighs 0 (masked) are not read.
template <typename T, int Chunks, int Heads>
AVX512 void weighted_values(const int64_t* heads, const T* v, int64_t value_stride, int64_t slots, int64_t padded,
                            const GroupScratch& scratch, T* out) {
  constexpr int64_t value_dim = Chunks * kLanes;
  __m512 acc[Heads][Chunks];
  for (int j = 0; j < Heads; ++j)
    for (int c = 0; c < Chunks; ++c) acc[j][c] = _mm512_setzero_ps();
  const float* weights[Heads];
  for (int j = 0; j < Heads; ++j) weights[j] = scratch.scores.data() + heads[j] * padded;
  for (int64_t first = 0; first < slots; first += kLanes) {
    __mmask16 weighed = 0;
    for (int j = 0; j < Heads; ++j)
      weighed |= _mm512_cmp_ps_mask(_mm512_loadu_ps(weights[j] + first), _mm512_setzero_ps(), _CMP_NEQ_UQ);
    for (; weighed != 0; weighed &= weighed - 1) {
      const int64_t s = first + __builtin_ctz(weighed);
      const T* value = v + s * value_stride;
      for (int c = 0; c < Chunks; ++c) {
        const __m512 widened_value = widened(value + c * kLanes);
        for (int j = 0; j < Heads; ++j)
          acc[j][c] = _mm512_fmadd_ps(_mm512_set1_ps(weights[j][s]), widened_value, acc[j][c]);
      }
    }
  }
  for (int j = 0; j < Heads; ++j) {
    const __m512 inverse = _mm512_set1_ps(1.0f / scratch.total[heads[j]]);
    for (int c = 0; c < Chunks; ++c)
      narrowed(out + heads[j] * value_dim + c * kLanes, _mm512_mul_ps(acc[j][c], inverse));
  }
}

// The `heads` query heads of one KV head (rows `q`, masks `mask` + h · `mask_head_stride`), `Chunks` · 16 dims. A
// head whose every slot is masked goes to `attend`, which scores it in full.
template <typename T, int Chunks>
AVX512 void attend_group(const T* q, int64_t heads, const T* k, const T* v, int64_t key_stride, int64_t value_stride,
                         const T* mask, int64_t mask_head_stride, int64_t slots, float scale, int64_t padded,
                         GroupScratch& scratch, T* out) {
  constexpr int64_t head_dim = Chunks * kLanes, value_dim = head_dim;
  const __m512 masked = _mm512_set1_ps(static_cast<float>(std::numeric_limits<T>::lowest()));
  const float minus_infinity = -std::numeric_limits<float>::infinity();
  float* query = scratch.query.data();
  float* keys = scratch.keys.data();
  float* maximum = scratch.maximum.data();
  float* total = scratch.total.data();
  std::fill(maximum, maximum + heads, minus_infinity);
  for (int64_t i = 0; i < heads * Chunks; ++i)
    _mm512_storeu_ps(query + i * kLanes, _mm512_mul_ps(widened(q + i * kLanes), _mm512_set1_ps(scale)));
  for (int64_t first = 0; first < slots; first += kLanes) {
    const int64_t count = std::min(kLanes, slots - first);
    const __mmask16 lanes = count == kLanes ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1);
    // A slot masked for every head of the group is not read (its keys left 0).
    __mmask16 read = 0;
    for (int64_t h = 0; h < heads; ++h)
      read |= _mm512_mask_cmp_ps_mask(lanes, widened_part(mask + h * mask_head_stride + first, lanes), masked,
                                      _CMP_NEQ_UQ);
    if (read == 0) {
      for (int64_t h = 0; h < heads; ++h)
        _mm512_mask_storeu_ps(scratch.scores.data() + h * padded + first, lanes, _mm512_set1_ps(minus_infinity));
      continue;
    }
    for (int64_t i = 0; i < kLanes; ++i)
      for (int64_t c = 0; c < Chunks; ++c)
        _mm512_storeu_ps(keys + i * head_dim + c * kLanes,
                         (read >> i) & 1 ? widened(k + (first + i) * key_stride + c * kLanes) : _mm512_setzero_ps());
    for (int64_t h = 0; h < heads; ++h) {
      __m512 head_query[Chunks];
      for (int c = 0; c < Chunks; ++c) head_query[c] = _mm512_loadu_ps(query + h * head_dim + c * kLanes);
      __m512 dots[kLanes];
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i) {
        dots[i] = _mm512_mul_ps(head_query[0], _mm512_loadu_ps(keys + i * head_dim));
        for (int c = 1; c < Chunks; ++c)
          dots[i] = _mm512_fmadd_ps(head_query[c], _mm512_loadu_ps(keys + i * head_dim + c * kLanes), dots[i]);
      }
      const __m512 bias = widened_part(mask + h * mask_head_stride + first, lanes);
      const __mmask16 unmasked = _mm512_mask_cmp_ps_mask(lanes, bias, masked, _CMP_NEQ_UQ);
      const __m512 scores = _mm512_mask_add_ps(_mm512_set1_ps(minus_infinity), unmasked, lane_sums(dots), bias);
      _mm512_mask_storeu_ps(scratch.scores.data() + h * padded + first, lanes, scores);
      maximum[h] = std::max(maximum[h], _mm512_reduce_max_ps(scores));
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    if (maximum[h] == minus_infinity) {
      attend<T>(q + h * head_dim, k, v, key_stride, value_stride, mask + h * mask_head_stride, slots, head_dim,
                value_dim, scale, scratch.one_head.data(), padded, out + h * value_dim);
      continue;
    }
    float* scores = scratch.scores.data() + h * padded;
    for (int64_t s = slots; s < padded; ++s) scores[s] = minus_infinity;
    __m512 sum = _mm512_setzero_ps();
    const __m512 shift = _mm512_set1_ps(maximum[h]);
    for (int64_t s = 0; s < padded; s += kLanes) {
      const __m512 weight = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + s), shift));
      _mm512_storeu_ps(scores + s, weight);
      sum = _mm512_add_ps(sum, weight);
    }
    total[h] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t first = 0; first < heads; first += kValueHeads) {
    int64_t together[kValueHeads], count = 0;
    for (int64_t h = first; h < std::min(heads, first + kValueHeads); ++h)
      if (maximum[h] != minus_infinity) together[count++] = h;
    switch (count) {
      case 0: break;
      case 1: weighted_values<T, Chunks, 1>(together, v, value_stride, slots, padded, scratch, out); break;
      case 2: weighted_values<T, Chunks, 2>(together, v, value_stride, slots, padded, scratch, out); break;
      case 3: weighted_values<T, Chunks, 3>(together, v, value_stride, slots, padded, scratch, out); break;
      default: weighted_values<T, Chunks, 4>(together, v, value_stride, slots, padded, scratch, out); break;
    }
  }
}

template <typename T>
using GroupAttention = void (*)(const T*, int64_t, const T*, const T*, int64_t, int64_t, const T*, int64_t, int64_t,
                                float, int64_t, GroupScratch&, T*);

template <typename T>
GroupAttention<T> group_attention_for(int64_t head_dim) {
  switch (head_dim / kLanes) {
    case 1: return attend_group<T, 1>;
    case 2: return attend_group<T, 2>;
    case 3: return attend_group<T, 3>;
    case 4: return attend_group<T, 4>;
    case 5: return attend_group<T, 5>;
    case 6: return attend_group<T, 6>;
    case 7: return attend_group<T, 7>;
    default: return attend_group<T, 8>;
  }
}

bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"); }

template <typename T>
void decode_attention_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale, at::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(3);
  const int64_t slots = k.size(2), value_dim = v.size(3), group = heads / k.size(1);
  const int64_t padded = (slots + kLanes - 1) / kLanes * kLanes;
  const T* q_data = q.data_ptr<T>();
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  const T* mask_data = mask.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  const bool mask_per_head = mask.size(1) != 1;
  const int64_t kv_heads = k.size(1);
  // One task per KV head of a row: its group of query heads shares each key and value read. Values of another
  // width than the keys go a head at a time.
  const GroupAttention<T> attend_heads = group_attention_for<T>(head_dim);
  const int64_t mask_head_stride = mask_per_head ? mask.stride(1) : 0;
  // A task's keys and values come from DRAM (a decode step's weights have flushed the caches since the layer wrote
  // them), in short streams the hardware prefetchers pick up late: a thread asks for its first task's unmasked
  // slots into L2 and, while it computes each task, for the next one's. SmolLM2's layer at batch 8 with each
  // call's caches flushed, 2-core AMD EPYC: 38.5 -> 30.3 us; batch 1: 15.9 -> 13.9 us.
  const float masked = static_cast<float>(std::numeric_limits<T>::lowest());
  auto prefetch_task = [&](int64_t task) {
    const int64_t b = task / kv_heads, kv = task % kv_heads;
    const auto* keys = reinterpret_cast<const char*>(k_data + b * k.stride(0) + kv * k.stride(1));
    const auto* values = reinterpret_cast<const char*>(v_data + b * v.stride(0) + kv * v.stride(1));
    const T* slot_mask = mask_data + b * mask.stride(0) + kv * group * mask_head_stride;
    for (int64_t s = 0; s < slots; ++s) {
      if (static_cast<float>(slot_mask[s]) == masked) continue;
      for (int64_t byte = 0; byte < head_dim * int64_t{sizeof(T)}; byte += 64)
        _mm_prefetch(keys + s * k.stride(2) * sizeof(T) + byte, _MM_HINT_T1);
      for (int64_t byte = 0; byte < value_dim * int64_t{sizeof(T)}; byte += 64)
        _mm_prefetch(values + s * v.stride(2) * sizeof(T) + byte, _MM_HINT_T1);
    }
  };
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t first, int64_t last) {
    GroupScratch scratch(group, head_dim, padded);
    prefetch_task(first);
    for (int64_t task = first; task < last; ++task) {
      if (task + 1 < last) prefetch_task(task + 1);
      const int64_t b = task / kv_heads, kv = task % kv_heads, h = kv * group;
      const T* group_q = q_data + (b * heads + h) * head_dim;
      const T* group_k = k_data + b * k.stride(0) + kv * k.stride(1);
      const T* group_v = v_data + b * v.stride(0) + kv * v.stride(1);
      const T* group_mask = mask_data + b * mask.stride(0) + h * mask_head_stride;
      T* group_out = out_data + (b * heads + h) * value_dim;
      if (value_dim == head_dim) {
        attend_heads(group_q, group, group_k, group_v, k.stride(2), v.stride(2), group_mask, mask_head_stride, slots,
                     static_cast<float>(scale), padded, scratch, group_out);
        continue;
      }
      for (int64_t i = 0; i < group; ++i)
        attend<T>(group_q + i * head_dim, group_k, group_v, k.stride(2), v.stride(2),
                  group_mask + i * mask_head_stride, slots, head_dim, value_dim, static_cast<float>(scale),
                  scratch.one_head.data(), padded, group_out + i * value_dim);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  const char* op = "decode_attention";
  TORCH_CHECK(cpu_has_avx512(), op, ": this CPU lacks AVX-512");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, op,
              ": query, keys, values and mask must be 4-d, got ", q.sizes(), " ", k.sizes(), " ", v.sizes(), " ",
              mask.sizes());
  TORCH_CHECK(q.is_contiguous() && q.size(2) == 1, op, ": query must be contiguous [batch, heads, 1, dim], got ",
              q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype &&
                  v.scalar_type() == dtype && mask.scalar_type() == dtype,
              op, ": query, keys, values and mask must share one dtype, float32 or bfloat16");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && q.size(1) % k.size(1) == 0 &&
                  v.size(1) == k.size(1) && v.size(2) == k.size(2) && k.size(3) == q.size(3),
              op, ": keys ", k.sizes(), " and values ", v.sizes(), " do not fit the query ", q.sizes());
  TORCH_CHECK(q.size(3) % kLanes == 0 && v.size(3) % kLanes == 0 && q.size(3) <= 8 * kLanes &&
                  v.size(3) <= 8 * kLanes,
              op, ": head dims must be multiples of 16 up to 128, got ", q.size(3), " and ", v.size(3));
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && mask.stride(3) == 1, op,
              ": keys, values and mask must be contiguous along their last dim");
  TORCH_CHECK(mask.size(0) == q.size(0) && (mask.size(1) == 1 || mask.size(1) == q.size(1)) && mask.size(2) == 1 &&
                  mask.size(3) >= k.size(2),
              op, ": mask ", mask.sizes(), " does not cover the query ", q.sizes(), " and ", k.size(2), " slots");
  at::Tensor out = at::empty({q.size(0), 1, q.size(1), v.size(3)}, q.options());
  if (dtype == at::kFloat) {
    decode_attention_typed<float>(q, k, v, mask, scale, out);
  } else {
    decode_attention_typed<c10::BFloat16>(q, k, v, mask, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recipes_scaffold, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(recipes_scaffold, CPU, m) { m.impl("decode_attention", &decode_attention); }

extern "C" AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                                          AtenTensorHandle mask, double scale,
                                                          AtenTensorHandle* result) {
  using recipes_scaffold::tensor_of;
  return recipes_scaffold::shim_call(result, decode_attention, tensor_of(q), tensor_of(k), tensor_of(v),
                                     tensor_of(mask), scale);
}
