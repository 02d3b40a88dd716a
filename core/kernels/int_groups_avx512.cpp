// Matrix products with integer weights in groups of 32 inputs (llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks, and
// weight_quant int4 / int8) on CPUs with AVX-512 BF16: y[m, n] = sum_k x[m, k] * w[n, k], x bfloat16, y float32.
//
// Exact to the stored weights: a code becomes a bfloat16 without rounding (4-bit: the bits 0x4300 | q are the
// number 128 + q; 8-bit: through float32), products of two bfloat16s are exact in float32, and the per-group
// scale and min (float16, as the file stores them) are applied in float32 once per group:
//   sum_k x_k (d q_k + m) = d * sum_k x_k (128 + q_k) + (m - 128 d) * sum_k x_k.
// Symmetric 4-bit groups (llama.cpp's Q4_0: m = -8 d) store no mins, and the group's dot product starts from the
// offset's term instead: sum_k x_k d (q_k - 8) = d * (-136 * sum_k x_k + sum_k x_k (128 + q_k)). One multiply-add a
// group and row instead of two: at batch 8 the products bind, and the two cost ~11% of the kernel's time.
//
// The weights are laid out for the kernel (core/kernels/layout.py): 16 output rows side by side, so that one
// vdpbf16ps multiplies 16 rows by a broadcast pair of inputs, and the decode step (one to eight activation rows)
// reads every weight byte once, unpacking it once for all rows. Each block's codes, scales and mins lie together,
// and two groups' blocks alternate, so that a thread reads its share of a weight as one stream: with codes, scales
// and mins in separate tensors (six streams a thread) the hardware prefetchers fell behind at batch 8, where the
// products leave time between reads (SmolLM2's 4-bit step from DRAM, 2-core AMD EPYC: 7.3 ms against 6.5 ms).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <vector>

#include "aoti_shim.h"

namespace {

constexpr int64_t kRows = 16;   // output rows one group of the layout holds
constexpr int64_t kBlock = 32;  // inputs per scale
constexpr int kMaxTile = 8;     // activation rows a pass over the weights serves
constexpr int64_t kPairedGroups = 2;  // groups whose blocks alternate in the layout
constexpr int64_t kScaleBytes = kRows * 2;
constexpr int64_t kFourBitRecord = 256 + 2 * kScaleBytes;  // codes, scales, mins
constexpr int64_t kSymmetricFourBitRecord = 256 + kScaleBytes;  // codes, scales
constexpr int64_t kEightBitRecord = 512 + kScaleBytes;     // codes, scales
// How far ahead of its reads a thread asks for its stream: ~3 blocks of a group pair, past what the hardware
// prefetchers fetch on their own at batch 8.
constexpr int64_t kPrefetchBytes = 2048;

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")))

AVX512_BF16 inline __m512 scale_of(const at::Half* halves) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves)));
}

AVX512_BF16 inline __m512bh pair_of(const uint16_t* x) {
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x)));
}

// Block `b` of group `g` in a run of `Groups` groups whose blocks alternate: codes, then float16 scales, then
// (4-bit) float16 mins.
template <int Groups>
inline const uint8_t* block_of(const uint8_t* run, int64_t record, int64_t b, int g) {
  return run + (b * Groups + g) * record;
}

template <int Groups>
inline void prefetch_ahead(const uint8_t* run, int64_t record, int64_t b) {
  const char* ahead = reinterpret_cast<const char*>(block_of<Groups>(run, record, b, 0)) + kPrefetchBytes;
  for (int64_t line = 0; line < Groups * record; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
}

// Independent accumulation chains per activation row: with few rows, one chain would wait on each vdpbf16ps's
// latency; eight rows keep the units busy alone.
template <int Tile>
constexpr int kChains = Tile >= 4 ? 1 : 4 / Tile;

template <int Tile>
AVX512_BF16 inline __m512 joined(const __m512 (&chains)[kChains<Tile>]) {
  __m512 sum = chains[0];
  for (int c = 1; c < kChains<Tile>; ++c) sum = _mm512_add_ps(sum, chains[c]);
  return sum;
}

// Every activation row's input pair `pair` times each group's weights `w`, into accumulation chain `chain`.
template <int Tile, int Groups>
AVX512_BF16 inline void accumulate(__m512 (&dot)[Groups][Tile][kChains<Tile>], const __m512bh (&w)[Groups],
                                   const uint16_t* x, int64_t k, int64_t pair, int chain) {
  for (int t = 0; t < Tile; ++t) {
    const __m512bh inputs = pair_of(x + t * k + 2 * pair);
    for (int g = 0; g < Groups; ++g) dot[g][t][chain] = _mm512_dpbf16_ps(dot[g][t][chain], w[g], inputs);
  }
}

template <int Tile, int Groups>
AVX512_BF16 inline void stored(const __m512 (&acc)[Groups][Tile], float* y, int64_t n) {
  for (int g = 0; g < Groups; ++g)
    for (int t = 0; t < Tile; ++t) _mm512_storeu_ps(y + t * n + g * kRows, acc[g][t]);
}

// One run of `Groups` 16-row groups against `Tile` activation rows, over all blocks. Each broadcast input pair
// feeds every group: one broadcast per product holds vdpbf16ps to ~83% of its rate (3.0 against 3.6 G/s a core,
// AMD EPYC), and the Q4_1 step's batch-8 products are most of its time. 4-bit layout per block: 4 chunks of 64
// bytes, each giving input pairs 4j..4j+3 of the 16 rows: lower nibbles through unpacklo / unpackhi (pairs 4j,
// 4j+1), upper nibbles the same way (pairs 4j+2, 4j+3). `terms`: each row's per-block input sums, times -136 when
// `Symmetric`.
template <int Tile, int Groups, bool Symmetric>
AVX512_BF16 void four_bit_group(const uint16_t* x, int64_t k, const float* terms, int64_t blocks, const uint8_t* run,
                                float* y, int64_t n) {
  constexpr int64_t record = Symmetric ? kSymmetricFourBitRecord : kFourBitRecord;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i exponent = _mm512_set1_epi8(0x43);
  const __m512 offset = _mm512_set1_ps(128.0f);
  __m512 acc[Groups][Tile] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_ahead<Groups>(run, record, b);
    __m512 dot[Groups][Tile][kChains<Tile>] = {};
    if constexpr (Symmetric)
      for (int t = 0; t < Tile; ++t) {
        const __m512 offset_term = _mm512_set1_ps(terms[t * blocks + b]);
        for (int g = 0; g < Groups; ++g) dot[g][t][0] = offset_term;
      }
    for (int j = 0; j < 4; ++j) {
      __m512i low[Groups], high[Groups];
      for (int g = 0; g < Groups; ++g) {
        const __m512i packed = _mm512_loadu_si512(block_of<Groups>(run, record, b, g) + 64 * j);
        low[g] = _mm512_and_si512(packed, nibble);
        high[g] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
      }
      for (int i = 0; i < 4; ++i) {
        __m512bh w[Groups];
        for (int g = 0; g < Groups; ++g) {
          const __m512i half = i < 2 ? low[g] : high[g];
          w[g] = reinterpret_cast<__m512bh>(i % 2 == 0 ? _mm512_unpacklo_epi8(half, exponent)
                                                       : _mm512_unpackhi_epi8(half, exponent));
        }
        accumulate<Tile, Groups>(dot, w, x, k, b * kBlock / 2 + 4 * j + i, (4 * j + i) % kChains<Tile>);
      }
    }
    for (int g = 0; g < Groups; ++g) {
      const auto* halves = reinterpret_cast<const at::Half*>(block_of<Groups>(run, record, b, g) + 256);
      const __m512 scale = scale_of(halves);
      if constexpr (Symmetric) {
        for (int t = 0; t < Tile; ++t) acc[g][t] = _mm512_fmadd_ps(joined<Tile>(dot[g][t]), scale, acc[g][t]);
      } else {
        const __m512 shifted_min = _mm512_fnmadd_ps(offset, scale, scale_of(halves + kRows));
        for (int t = 0; t < Tile; ++t) {
          acc[g][t] = _mm512_fmadd_ps(joined<Tile>(dot[g][t]), scale, acc[g][t]);
          acc[g][t] = _mm512_fmadd_ps(shifted_min, _mm512_set1_ps(terms[t * blocks + b]), acc[g][t]);
        }
      }
    }
  }
  stored<Tile, Groups>(acc, y, n);
}

// 8-bit layout per block: 16 chunks of 32 signed bytes, chunk p holding input pair p of the 16 rows.
template <int Tile, int Groups>
AVX512_BF16 void eight_bit_group(const uint16_t* x, int64_t k, const float*, int64_t blocks, const uint8_t* run,
                                 float* y, int64_t n) {
  constexpr int64_t record = kEightBitRecord;
  __m512 acc[Groups][Tile] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_ahead<Groups>(run, record, b);
    __m512 dot[Groups][Tile][kChains<Tile>] = {};
    for (int p = 0; p < 16; ++p) {
      __m512bh w[Groups];
      for (int g = 0; g < Groups; ++g) {
        const uint8_t* chunk = block_of<Groups>(run, record, b, g) + 32 * p;
        const __m512i first = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
        const __m512i second = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + 16)));
        w[g] = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(second), _mm512_cvtepi32_ps(first));
      }
      accumulate<Tile, Groups>(dot, w, x, k, b * kBlock / 2 + p, p % kChains<Tile>);
    }
    for (int g = 0; g < Groups; ++g) {
      const __m512 scale = scale_of(reinterpret_cast<const at::Half*>(block_of<Groups>(run, record, b, g) + 512));
      for (int t = 0; t < Tile; ++t) acc[g][t] = _mm512_fmadd_ps(joined<Tile>(dot[g][t]), scale, acc[g][t]);
    }
  }
  stored<Tile, Groups>(acc, y, n);
}

using GroupKernel = void (*)(const uint16_t*, int64_t, const float*, int64_t, const uint8_t*, float*, int64_t);

template <int Tile, int Groups>
struct FourBit {
  static constexpr GroupKernel kernel = four_bit_group<Tile, Groups, false>;
};
template <int Tile, int Groups>
struct SymmetricFourBit {
  static constexpr GroupKernel kernel = four_bit_group<Tile, Groups, true>;
};
template <int Tile, int Groups>
struct EightBit {
  static constexpr GroupKernel kernel = eight_bit_group<Tile, Groups>;
};

template <template <int, int> class Kernel, int Groups>
GroupKernel for_tile(int64_t tile) {
  switch (tile) {
    case 1: return Kernel<1, Groups>::kernel;
    case 2: return Kernel<2, Groups>::kernel;
    case 3: return Kernel<3, Groups>::kernel;
    case 4: return Kernel<4, Groups>::kernel;
    case 5: return Kernel<5, Groups>::kernel;
    case 6: return Kernel<6, Groups>::kernel;
    case 7: return Kernel<7, Groups>::kernel;
    default: return Kernel<8, Groups>::kernel;
  }
}

// Each block's sum of 32 bfloat16 inputs, in float32 (a bfloat16 is the upper half of a float32), times `factor`.
AVX512_BF16 void block_sums(const uint16_t* x, size_t count, float factor, float* sums) {
  for (size_t i = 0; i < count; ++i) {
    const __m512i values = _mm512_loadu_si512(x + i * kBlock);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(values, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(values, _mm512_set1_epi32(0xFFFF0000)));
    sums[i] = factor * _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
  }
}

bool cpu_has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

template <template <int, int> class Kernel>
at::Tensor int_groups_mm(const at::Tensor& x, const at::Tensor& weight, int64_t record, float sum_factor,
                         const char* op) {
  TORCH_CHECK(cpu_has_avx512_bf16(), op, ": this CPU lacks AVX-512 BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.device().is_cpu(), op,
              ": activations must be a contiguous 2-d bfloat16 CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.size(1) == record,
              op, ": the weight must be contiguous uint8 [groups x blocks, ", record,
              "] (core/kernels/layout.py), got ", weight.scalar_type(), " ", weight.sizes());
  const int64_t k = x.size(1), rows = x.size(0), blocks = k / kBlock;
  TORCH_CHECK(k % kBlock == 0 && blocks > 0 && weight.size(0) % blocks == 0, op, ": activations have ", k,
              " inputs, the weight ", weight.size(0), " blocks of ", kBlock, " (not a whole number of rows of ",
              k, ")");
  const int64_t groups = weight.size(0) / blocks, n = groups * kRows;
  at::Tensor y = at::empty({rows, n}, x.options().dtype(at::kFloat));
  if (rows == 0 || groups == 0) return y;

  const auto* inputs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  // Per-block input sums times `sum_factor`, for the mins' or the offset's term (8-bit codes have neither: 0).
  std::vector<float> sums(sum_factor != 0.0f ? rows * blocks : 0, 0.0f);
  block_sums(inputs, sums.size(), sum_factor, sums.data());
  const uint8_t* data = weight.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  const int64_t runs = (groups + kPairedGroups - 1) / kPairedGroups;
  at::parallel_for(0, runs, 1, [&](int64_t first, int64_t last) {
    for (int64_t run = first; run < last; ++run) {
      const int64_t g = run * kPairedGroups, together = std::min(kPairedGroups, groups - g);
      const uint8_t* run_data = data + g * blocks * record;
      for (int64_t r = 0; r < rows; r += kMaxTile) {
        const int64_t tile = std::min<int64_t>(kMaxTile, rows - r);
        const GroupKernel kernel = together == 2 ? for_tile<Kernel, 2>(tile) : for_tile<Kernel, 1>(tile);
        kernel(inputs + r * k, k, sums.empty() ? nullptr : sums.data() + r * blocks, blocks, run_data,
               out + r * n + g * kRows, n);
      }
    }
  });
  return y;
}

at::Tensor int4_groups_mm(const at::Tensor& x, const at::Tensor& weight) {
  return int_groups_mm<FourBit>(x, weight, kFourBitRecord, 1.0f, "int4_groups_mm");
}

at::Tensor int4_symmetric_groups_mm(const at::Tensor& x, const at::Tensor& weight) {
  return int_groups_mm<SymmetricFourBit>(x, weight, kSymmetricFourBitRecord, -136.0f, "int4_symmetric_groups_mm");
}

at::Tensor int8_groups_mm(const at::Tensor& x, const at::Tensor& weight) {
  return int_groups_mm<EightBit>(x, weight, kEightBitRecord, 0.0f, "int8_groups_mm");
}

}  // namespace

TORCH_LIBRARY(recipes_scaffold, m) {
  m.def("int4_groups_mm(Tensor x, Tensor weight) -> Tensor");
  m.def("int4_symmetric_groups_mm(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_groups_mm(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(recipes_scaffold, CPU, m) {
  m.impl("int4_groups_mm", &int4_groups_mm);
  m.impl("int4_symmetric_groups_mm", &int4_symmetric_groups_mm);
  m.impl("int8_groups_mm", &int8_groups_mm);
}

extern "C" {
AOTITorchError aoti_torch_cpu_int4_groups_mm(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* result) {
  using recipes_scaffold::tensor_of;
  return recipes_scaffold::shim_call(result, int4_groups_mm, tensor_of(x), tensor_of(weight));
}

AOTITorchError aoti_torch_cpu_int4_symmetric_groups_mm(AtenTensorHandle x, AtenTensorHandle weight,
                                                       AtenTensorHandle* result) {
  using recipes_scaffold::tensor_of;
  return recipes_scaffold::shim_call(result, int4_symmetric_groups_mm, tensor_of(x), tensor_of(weight));
}

AOTITorchError aoti_torch_cpu_int8_groups_mm(AtenTensorHandle x, AtenTensorHandle weight, AtenTensorHandle* result) {
  using recipes_scaffold::tensor_of;
  return recipes_scaffold::shim_call(result, int8_groups_mm, tensor_of(x), tensor_of(weight));
}
}
