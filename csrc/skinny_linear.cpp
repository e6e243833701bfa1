// CPU kernel of torch.ops.dflare.skinny_linear: y[M, N] = x[M, K] W[N, K]^T (+ b) for the
// few rows a decode step or a speculative verify pass has (M <= 8 tokens).
//
// Why: with M this small the product is bound by reading W from memory, and a BLAS reads it
// badly here. Measured on a 2-core AMD EPYC (benchmarks/RESULTS.md): MKL's M = 1 GEMV streams
// SmolLM2-135M's weights at ~12 GB/s and its M = 2..8 GEMMs pack W on every call (a 4-row
// pass costs ~1.4x a 1-row one), while this loop reads each row of W once, for all M rows of
// x at the same time, at close to the machine's ~30 GB/s. The reference is F.linear
// (dflare_sgl/skinny_linear.py); results match it to float32 rounding, not bit for bit,
// as any two GEMM implementations do.
#include <ATen/Parallel.h>

#include <cstring>

#include "dflare_ops.h"

namespace dflare {
namespace {

// The helpers below are always inlined into the per-ISA clones of skinny_rows, so the
// 64-byte vector type never crosses a call boundary (GCC's -Wpsabi note does not apply).
#pragma GCC diagnostic ignored "-Wpsabi"

constexpr int64_t kLanes = 16;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

__attribute__((always_inline)) inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

// A fixed summation tree, the same in every clone (only the AVX-512 clone fuses multiply-adds,
// so results can differ in the last bit between CPU generations, never between runs).
__attribute__((always_inline)) inline float sum_lanes(Lanes v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof v);
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) t[j] += t[j + width];
  return t[0];
}

// Rows [n0, n1) of y for M rows of x, R rows of W at a time: the R x M accumulators stay in
// registers, each loaded W vector serves M FMAs and each x vector R. Compiled for AVX-512,
// AVX2 and baseline x86-64, picked at load time, so one wheel runs on any x86-64 CPU.
template <int M, int R>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void skinny_rows(const float* x, const float* w, const float* bias, float* y, int64_t K,
                 int64_t N, int64_t n0, int64_t n1) {
  const int64_t k_vec = K / kLanes * kLanes;
  for (int64_t n = n0; n < n1; n += R) {
    const int64_t rows = n + R <= n1 ? R : n1 - n;
    Lanes acc[R][M] = {};
    if (rows == R) {
      for (int64_t k = 0; k < k_vec; k += kLanes) {
        Lanes wv[R];
        for (int r = 0; r < R; ++r) wv[r] = load_lanes(w + (n + r) * K + k);
        // With R > 1 streams the hardware prefetcher alone falls short of bandwidth here
        // (measured ~15% slower); fetch the next group's rows two groups ahead.
        if constexpr (R > 1)
          for (int r = 0; r < R; ++r)
            __builtin_prefetch(w + (n + 2 * R + r) * K + k, /*rw=*/0, /*locality=*/0);
        for (int m = 0; m < M; ++m) {
          const Lanes xv = load_lanes(x + m * K + k);
          for (int r = 0; r < R; ++r) acc[r][m] += xv * wv[r];
        }
      }
    } else {
      for (int64_t k = 0; k < k_vec; k += kLanes)
        for (int64_t r = 0; r < rows; ++r) {
          const Lanes wv = load_lanes(w + (n + r) * K + k);
          for (int m = 0; m < M; ++m) acc[r][m] += load_lanes(x + m * K + k) * wv;
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* w_row = w + (n + r) * K;
      for (int m = 0; m < M; ++m) {
        float s = sum_lanes(acc[r][m]);
        for (int64_t k = k_vec; k < K; ++k) s += x[m * K + k] * w_row[k];
        y[m * N + n + r] = bias == nullptr ? s : s + bias[n + r];
      }
    }
  }
}

template <int M, int R>
void skinny_linear_m(const float* x, const float* w, const float* bias, float* y, int64_t K,
                     int64_t N) {
  // 64 rows of W (~150 KB at K = 576) per task: enough work to amortise a thread wake-up.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    skinny_rows<M, R>(x, w, bias, y, K, N, n0, n1);
  });
}

}  // namespace

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "skinny_linear: x must be [M, K] and weight [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kSkinnyLinearMaxRows,
              "skinny_linear: x must have 1 to ", kSkinnyLinearMaxRows, " rows, got ",
              x.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "skinny_linear: x and weight must be float32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(),
              "skinny_linear: x and weight must be contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "skinny_linear: bias must be a contiguous float32 [N]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // R: rows of W read side by side. One sequential stream (R = 1) reads fastest, measured on
  // the 2-core EPYC: 1.5x faster than R = 8 at M = 1, 1.2x than R = 4 at M = 4; from M = 5 the
  // x loads dominate and R = 2 (each x vector serving two rows) wins.
  switch (M) {
    case 1: skinny_linear_m<1, 1>(xp, wp, bp, yp, K, N); break;
    case 2: skinny_linear_m<2, 1>(xp, wp, bp, yp, K, N); break;
    case 3: skinny_linear_m<3, 1>(xp, wp, bp, yp, K, N); break;
    case 4: skinny_linear_m<4, 1>(xp, wp, bp, yp, K, N); break;
    case 5: skinny_linear_m<5, 2>(xp, wp, bp, yp, K, N); break;
    case 6: skinny_linear_m<6, 2>(xp, wp, bp, yp, K, N); break;
    case 7: skinny_linear_m<7, 2>(xp, wp, bp, yp, K, N); break;
    default: skinny_linear_m<8, 2>(xp, wp, bp, yp, K, N); break;
  }
  return y;
}

}  // namespace dflare
