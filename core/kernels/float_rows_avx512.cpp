// Matrix products with bfloat16 (AVX-512 BF16) or float32 (AVX-512F) weights: y[m, n] = sum_k x[m, k] w[n, k],
// accumulated in float32, y in x's dtype. Made for the decode step's few activation rows; a prompt's rows take eight
// at a time over each run of weights, which stays in cache.
//
// Decode reads every weight once a step and does a few multiply-adds per weight byte: the weights' bytes bound its
// time. torch's fast path for such products (inductor's C++ GEMM template on weights frozen into the graph and
// prepacked) keeps a compiled graph out of inductor's FX-graph cache, so every process lowers it again (~40 s for
// SmolLM2 on 2 AMD EPYC cores); these products take their weights as graph inputs.
//
// The weights are laid out for the kernel (core/kernels/layout.py, float_rows_layout): runs of 32 output rows (16 in
// a weight's last run when its rows are an odd number of 16s), each run's weights input step by input step, the run's
// rows side by side: a step is one input pair of bfloat16s (vdpbf16ps multiplies a row's pair at once) or one
// float32 input. One vector holds a step of 16 rows, multiplied by the activation rows' step broadcast, and a thread
// reads its runs front to back, one stream of memory. Read row by row from the checkpoint's own layout instead, the
// small products streamed at ~28 GB/s against ~45 for the large ones and a step of SmolLM2 bf16 took 13 ms against
// the GEMM template's 9.7.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "aoti_shim.h"

namespace {

constexpr int64_t kRows = 16;     // output rows a vector holds
constexpr int64_t kRunRows = 32;  // output rows a run holds
constexpr int kMaxTile = 8;       // activation rows a pass over a run multiplies

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// bfloat16: a step is an input pair; a row's pair of weights and the broadcast pair of inputs meet in vdpbf16ps.
struct Bf16 {
  using Scalar = at::BFloat16;
  static constexpr int64_t kStep = 2;
  AVX512_BF16 static __m512 multiply_add(__m512 acc, const Scalar* weights, const Scalar* inputs) {
    const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(weights));
    const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(inputs)));
    return _mm512_dpbf16_ps(acc, w, x);
  }
  // Rounded to nearest even, as torch rounds a float32 to bfloat16.
  AVX512_BF16 static void store(Scalar* y, __m512 sums) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(sums)));
  }
};

struct Fp32 {
  using Scalar = float;
  static constexpr int64_t kStep = 1;
  AVX512_BF16 static __m512 multiply_add(__m512 acc, const Scalar* weights, const Scalar* inputs) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(weights), _mm512_set1_ps(*inputs), acc);
  }
  AVX512_BF16 static void store(Scalar* y, __m512 sums) { _mm512_storeu_ps(y, sums); }
};

// Independent accumulation chains per product: with few activation rows, one chain would wait on each
// multiply-add's latency.
template <int Tile>
constexpr int kChains = Tile >= 4 ? 1 : 4 / Tile;

// Input step `at` of a run of `Groups` 16-row vectors times each activation row's, into chain `c`.
template <typename Ops, int Tile, int Groups, int Chains>
AVX512_BF16 inline void step_into(__m512 (&acc)[Groups][Tile][Chains], int c, const typename Ops::Scalar* run,
                                  int64_t at, const typename Ops::Scalar* x, int64_t k) {
  const typename Ops::Scalar* weights = run + at * Groups * kRows * Ops::kStep;
  for (int t = 0; t < Tile; ++t)
    for (int g = 0; g < Groups; ++g)
      acc[g][t][c] = Ops::multiply_add(acc[g][t][c], weights + g * kRows * Ops::kStep, x + t * k + at * Ops::kStep);
}

// One run of `Groups` 16-row vectors (run: its weights, k inputs) times `Tile` activation rows (stride k) into y
// (row stride n).
template <typename Ops, int Tile, int Groups>
AVX512_BF16 void run_times_tile(const typename Ops::Scalar* x, int64_t k, const typename Ops::Scalar* run,
                                typename Ops::Scalar* y, int64_t n) {
  constexpr int chains = kChains<Tile>;
  __m512 acc[Groups][Tile][chains];
  for (int g = 0; g < Groups; ++g)
    for (int t = 0; t < Tile; ++t)
      for (int c = 0; c < chains; ++c) acc[g][t][c] = _mm512_setzero_ps();
  const int64_t steps = k / Ops::kStep;
  int64_t s = 0;
  for (; s + chains <= steps; s += chains)
    for (int c = 0; c < chains; ++c) step_into<Ops, Tile, Groups, chains>(acc, c, run, s + c, x, k);
  for (; s < steps; ++s) step_into<Ops, Tile, Groups, chains>(acc, 0, run, s, x, k);
  for (int g = 0; g < Groups; ++g)
    for (int t = 0; t < Tile; ++t) {
      __m512 sums = acc[g][t][0];
      for (int c = 1; c < chains; ++c) sums = _mm512_add_ps(sums, acc[g][t][c]);
      Ops::store(y + t * n + g * kRows, sums);
    }
}

template <typename Ops>
using RunKernel = void (*)(const typename Ops::Scalar*, int64_t, const typename Ops::Scalar*, typename Ops::Scalar*,
                           int64_t);

template <typename Ops, int Groups>
RunKernel<Ops> for_tile(int64_t tile) {
  switch (tile) {
    case 1: return run_times_tile<Ops, 1, Groups>;
    case 2: return run_times_tile<Ops, 2, Groups>;
    case 3: return run_times_tile<Ops, 3, Groups>;
    case 4: return run_times_tile<Ops, 4, Groups>;
    case 5: return run_times_tile<Ops, 5, Groups>;
    case 6: return run_times_tile<Ops, 6, Groups>;
    case 7: return run_times_tile<Ops, 7, Groups>;
    default: return run_times_tile<Ops, 8, Groups>;
  }
}

template <typename Ops>
void float_rows(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y) {
  using Scalar = typename Ops::Scalar;
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0) / k;
  const Scalar* inputs = x.data_ptr<Scalar>();
  const Scalar* weights = weight.data_ptr<Scalar>();
  Scalar* out = y.data_ptr<Scalar>();
  const int64_t runs = (n + kRunRows - 1) / kRunRows;
  at::parallel_for(0, runs, 1, [&](int64_t first, int64_t last) {
    for (int64_t run = first; run < last; ++run) {
      const int64_t row = run * kRunRows;
      const bool whole = n - row >= kRunRows;
      for (int64_t m = 0; m < rows; m += kMaxTile) {
        const int64_t tile = std::min<int64_t>(kMaxTile, rows - m);
        const RunKernel<Ops> kernel = whole ? for_tile<Ops, 2>(tile) : for_tile<Ops, 1>(tile);
        kernel(inputs + m * k, k, weights + row * k, out + m * n + row, n);
      }
    }
  });
}

bool cpu_has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// weight: the layout's flat [rows * k] (rows a multiple of 16), of x's dtype.
at::Tensor float_rows_mm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "float_rows_mm: this CPU lacks AVX-512 BF16");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
                  (dtype == at::kBFloat16 || dtype == at::kFloat),
              "float_rows_mm: activations must be a contiguous 2-d bfloat16 or float32 CPU tensor, got ", dtype, " ",
              x.sizes());
  const int64_t k = x.size(1), step = dtype == at::kBFloat16 ? Bf16::kStep : Fp32::kStep;
  TORCH_CHECK(k > 0 && k % step == 0, "float_rows_mm: ", dtype, " products take a multiple of ", step,
              " inputs, got ", k);
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.scalar_type() == dtype &&
                  weight.numel() % (kRows * k) == 0,
              "float_rows_mm: the weight must be a contiguous 1-d ", dtype, " tensor of rows x ", k,
              " values, rows a multiple of ", kRows, " (core/kernels/layout.py), got ", weight.scalar_type(), " ",
              weight.sizes());
  at::Tensor y = at::empty({x.size(0), weight.numel() / k}, x.options());
  if (y.numel() == 0) return y;
  if (dtype == at::kBFloat16) {
    float_rows<Bf16>(x, weight, y);
  } else {
    float_rows<Fp32>(x, weight, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recipes_scaffold, m) { m.def("float_rows_mm(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(recipes_scaffold, CPU, m) { m.impl("float_rows_mm", &float_rows_mm); }

extern "C" AOTITorchError aoti_torch_cpu_float_rows_mm(AtenTensorHandle x, AtenTensorHandle weight,
                                                      AtenTensorHandle* result) {
  using recipes_scaffold::tensor_of;
  return recipes_scaffold::shim_call(result, float_rows_mm, tensor_of(x), tensor_of(weight));
}
