// One new query per row attending to a static cache, on CPUs with AVX-512: softmax(q kᵀ · scale + mask) v per
// query head, the keys and values of its KV head shared by the heads of its group (no copies per head).
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

namespace {

constexpr int64_t kLanes = 16;

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
  __m512 query[8];
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
  __m512 acc[8];
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
  // One task per query head: a batch-1 step has only a few KV heads for two or more threads; a group's keys and
  // values are read again by each of its heads from cache.
  at::parallel_for(0, batch * heads, 1, [&](int64_t first, int64_t last) {
    std::vector<float> scores(padded);
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / heads, h = task % heads, kv = h / group;
      const T* row_mask = mask_data + b * mask.stride(0) + (mask_per_head ? h * mask.stride(1) : 0);
      attend<T>(q_data + task * head_dim, k_data + b * k.stride(0) + kv * k.stride(1),
                v_data + b * v.stride(0) + kv * v.stride(1), k.stride(2), v.stride(2), row_mask, slots, head_dim,
                value_dim, static_cast<float>(scale), scores.data(), padded, out_data + task * value_dim);
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
