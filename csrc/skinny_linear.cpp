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

// The helpers below are always inlined into the per-ISA entry points of skinny_rows, so a
// vector type never crosses a call boundary (GCC's -Wpsabi note does not apply).
#pragma GCC diagnostic ignored "-Wpsabi"

// W floats, one register of the ISA the code is compiled for: 16 (AVX-512), 8 (AVX2), 4.
// A vector wider than the ISA's registers is split by GCC through memory: a 16-float vector
// in the AVX2 build read weights at ~5 GB/s, 3x slower than torch's GEMV (measured on an AVX2
// EPYC), so each ISA gets its own width.
template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
};

template <int W>
__attribute__((always_inline)) inline typename Lanes<W>::type load_lanes(const float* p) {
  typename Lanes<W>::type v;
  std::memcpy(&v, p, sizeof v);  // unaligned load
  return v;
}

// A fixed summation tree per width: results are the same on every run of one CPU, and may
// differ in the last bit between ISAs (lane count, fused multiply-adds where the ISA has them).
template <int W>
__attribute__((always_inline)) inline float sum_lanes(typename Lanes<W>::type v) {
  float t[W];
  std::memcpy(t, &v, sizeof v);
  for (int width = W / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) t[j] += t[j + width];
  return t[0];
}

// Rows [n0, n1) of y for M rows of x, R rows of W at a time: the R x M accumulators stay in
// registers, each loaded W vector serves M FMAs and each x vector R.
template <int L, int M, int R>
__attribute__((always_inline)) inline void skinny_rows(const float* x, const float* w,
                                                       const float* bias, float* y, int64_t K,
                                                       int64_t N, int64_t n0, int64_t n1) {
  using Vec = typename Lanes<L>::type;
  const int64_t k_vec = K / L * L;
  for (int64_t n = n0; n < n1; n += R) {
    const int64_t rows = n + R <= n1 ? R : n1 - n;
    Vec acc[R][M] = {};
    if (rows == R) {
      for (int64_t k = 0; k < k_vec; k += L) {
        Vec wv[R];
        for (int r = 0; r < R; ++r) wv[r] = load_lanes<L>(w + (n + r) * K + k);
        // With R > 1 streams the hardware prefetcher alone falls short of bandwidth here
        // (measured ~15% slower); fetch the next group's rows two groups ahead.
        if constexpr (R > 1)
          for (int r = 0; r < R; ++r)
            __builtin_prefetch(w + (n + 2 * R + r) * K + k, /*rw=*/0, /*locality=*/0);
        for (int m = 0; m < M; ++m) {
          const Vec xv = load_lanes<L>(x + m * K + k);
          for (int r = 0; r < R; ++r) acc[r][m] += xv * wv[r];
        }
      }
    } else {
      for (int64_t k = 0; k < k_vec; k += L)
        for (int64_t r = 0; r < rows; ++r) {
          const Vec wv = load_lanes<L>(w + (n + r) * K + k);
          for (int m = 0; m < M; ++m) acc[r][m] += load_lanes<L>(x + m * K + k) * wv;
        }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* w_row = w + (n + r) * K;
      for (int m = 0; m < M; ++m) {
        float s = sum_lanes<L>(acc[r][m]);
        for (int64_t k = k_vec; k < K; ++k) s += x[m * K + k] * w_row[k];
        y[m * N + n + r] = bias == nullptr ? s : s + bias[n + r];
      }
    }
  }
}

using RowsFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t,
                        int64_t, int64_t);

// One entry point per ISA, picked at run time, so one wheel runs on any x86-64 CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <int M, int R>
__attribute__((target("avx512f"))) void rows_avx512(const float* x, const float* w,
                                                    const float* b, float* y, int64_t K,
                                                    int64_t N, int64_t n0, int64_t n1) {
  skinny_rows<16, M, R>(x, w, b, y, K, N, n0, n1);
}

template <int M, int R>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const float* w,
                                                   const float* b, float* y, int64_t K,
                                                   int64_t N, int64_t n0, int64_t n1) {
  skinny_rows<8, M, R>(x, w, b, y, K, N, n0, n1);
}
#endif

template <int M, int R>
void rows_baseline(const float* x, const float* w, const float* b, float* y, int64_t K,
                   int64_t N, int64_t n0, int64_t n1) {
  skinny_rows<4, M, R>(x, w, b, y, K, N, n0, n1);
}

template <int M, int R>
RowsFn rows_for_this_cpu() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (__builtin_cpu_supports("avx512f")) return rows_avx512<M, R>;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return rows_avx2<M, R>;
#endif
  return rows_baseline<M, R>;
}

template <int M, int R>
void skinny_linear_m(const float* x, const float* w, const float* bias, float* y, int64_t K,
                     int64_t N) {
  static const RowsFn rows = rows_for_this_cpu<M, R>();
  // 64 rows of W (~150 KB at K = 576) per task: enough work to amortise a thread wake-up.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows(x, w, bias, y, K, N, n0, n1); });
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
