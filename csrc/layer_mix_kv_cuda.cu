// layer_mix_kv on NVIDIA GPUs. The definition is dflare_sgl/layer_mix.py; layer_mix_kv.cpp is
// the CPU twin and holds the argument checks and the projection step both devices share.
//
// Three steps, each on the unit that bounds it:
//   1. mix_norm_kernel: one CTA per token reads the token's [T, H] hidden states once
//      (16-byte vector loads), accumulates up to 8 layer mixes per pass in registers, and
//      writes the D hidden_norm'ed contexts ctx [D, N, H].
//   2. The K and V projections: one cuBLAS GEMM batched over the D layers ([D, N, H] x
//      [D, H, 2*KVH*hd], bias in the GEMM's epilogue) when each layer's V rows follow its K
//      rows in memory (the SGLang drafts store them so), else K and V after one concatenation.
//   3. rope_store_kernel: one warp per (token, layer, kv head) applies k_norm and RoPE,
//      casts, and scatters K and V into the D paged caches. The cache pointers travel by
//      value in the kernel parameters: nothing to upload, so the op is CUDA-graph safe.
//
// Budget at N=4096 new tokens, H=4096, T=9, D=7, KVH*hd=1024 in bf16 on an H100:
//   compute: 2 * N * H * (2 * D * KVH*hd) = 481 GFLOP of projections, ~0.6-0.7 ms at the
//     ~700 TFLOP/s cuBLAS reaches: the op is compute-bound.
//   traffic: the floor is hidden 302 MB + weights 117 MB + cache writes 117 MB = 0.54 GB
//     (~0.17 ms at 3.35 TB/s). This design adds the ctx round trip (235 MB written, then
//     read by the GEMM) and the projected K/V round trip (117 MB each way), ~0.7 GB more,
//     ~0.2 ms when nothing overlaps. Removing them needs a custom Hopper GEMM (TMA + wgmma)
//     whose A-operand producer mixes and normalises (the row's RMS must be known before the
//     first K tile, so hidden is read twice) and whose epilogue does k_norm + RoPE + scatter
//     on whole heads. Until the GEMMs themselves run near peak, the readable split wins.
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "dflare_ops.h"

namespace dflare {

namespace {

constexpr int kLayersPerPass = 8;  // layer mixes held in registers per pass over hidden
constexpr int kMaxLayers = 64;     // cache pointer table size (2 KiB of kernel parameters)
constexpr int kWarp = 32;
constexpr int64_t kTileTokens = 2048;  // tokens per pass of a long prefill

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename cache_t>
struct CacheTable {
  cache_t* k[kMaxLayers];
  cache_t* v[kMaxLayers];
  int64_t k_slot_stride[kMaxLayers];
  int64_t v_slot_stride[kMaxLayers];
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// Sums each x[k] over the CTA; every thread gets the totals. scratch holds K * 32 floats.
template <int K>
__device__ void block_sum(float (&x)[K], float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    x[k] = warp_sum(x[k]);
    if (lane == 0) scratch[k * kWarp + warp] = x[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) x[k] = warp_sum(lane < warps ? scratch[k * kWarp + lane] : 0.f);
  __syncthreads();  // scratch is reused by the next call
}

// ctx[d, n] = hidden_norm(base[n] + sum_t probs[d, t] * src[n, t]), one token n per CTA.
// probs are rounded to scalar_t and the sum is accumulated in float32 and rounded once, as the
// reference's einsum (a GEMM) does; base (DFly's fc output [N, H], null otherwise) is then
// added in scalar_t, as the reference's tensor sum. probs == nullptr means one layer with
// weight 1 (DFlash: src is fc's output and only the norm applies). The second sweep re-reads the context
// values this same thread wrote, so no barrier is needed for them.
template <typename scalar_t, int VEC>
__global__ void mix_norm_kernel(const scalar_t* __restrict__ src, const float* __restrict__ probs,
                                const scalar_t* __restrict__ base,
                                const scalar_t* __restrict__ norm_weight,
                                scalar_t* __restrict__ ctx, int64_t num_tokens, int t_layers,
                                int d_layers, int h, float eps) {
  using P = Pack<scalar_t, VEC>;
  __shared__ float scratch[kLayersPerPass * kWarp];
  const int64_t n = blockIdx.x;
  const int h_vecs = h / VEC;
  const P* in = reinterpret_cast<const P*>(src + n * t_layers * h);
  const P* weight = reinterpret_cast<const P*>(norm_weight);
  const P* base_row = base ? reinterpret_cast<const P*>(base + n * h) : nullptr;
  auto row = [&](int d) { return reinterpret_cast<P*>(ctx + (d * num_tokens + n) * h); };

  for (int d0 = 0; d0 < d_layers; d0 += kLayersPerPass) {
    float sum_sq[kLayersPerPass] = {};
    for (int i = threadIdx.x; i < h_vecs; i += blockDim.x) {
      float acc[kLayersPerPass][VEC] = {};
      for (int t = 0; t < t_layers; ++t) {
        const P x = in[t * h_vecs + i];
#pragma unroll
        for (int j = 0; j < kLayersPerPass; ++j) {
          if (d0 + j >= d_layers) break;
          const float p =
              probs ? static_cast<float>(static_cast<scalar_t>(probs[(d0 + j) * t_layers + t]))
                    : 1.f;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][e] += p * static_cast<float>(x.v[e]);
        }
      }
#pragma unroll
      const P b = base_row ? base_row[i] : P{};
#pragma unroll
      for (int j = 0; j < kLayersPerPass; ++j) {
        if (d0 + j >= d_layers) break;
        P y;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          y.v[e] = static_cast<scalar_t>(acc[j][e]);
          if (base_row) y.v[e] = y.v[e] + b.v[e];
          const float f = static_cast<float>(y.v[e]);
          sum_sq[j] += f * f;
        }
        row(d0 + j)[i] = y;
      }
    }
    block_sum(sum_sq, scratch);
    for (int i = threadIdx.x; i < h_vecs; i += blockDim.x) {
      const P w = weight[i];
#pragma unroll
      for (int j = 0; j < kLayersPerPass; ++j) {
        if (d0 + j >= d_layers) break;
        // As primitives.rms_norm: normalise in float32, round, then multiply by the weight.
        const float r = rsqrtf(sum_sq[j] / static_cast<float>(h) + eps);
        P y = row(d0 + j)[i];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          y.v[e] = w.v[e] * static_cast<scalar_t>(static_cast<float>(y.v[e]) * r);
        }
        row(d0 + j)[i] = y;
      }
    }
  }
}

// One warp per (token, layer, kv head): k_norm + RoPE + cast of the K head, cast of the V
// head, stored at the token's slot of that layer's caches. k and v are [D, N, KVH*hd] with
// unit stride in the last dim. Each elementwise step rounds to scalar_t, as the reference.
template <typename scalar_t, typename cache_t>
__global__ void rope_store_kernel(
    const scalar_t* __restrict__ k, int64_t k_stride_d, int64_t k_stride_n,
    const scalar_t* __restrict__ v, int64_t v_stride_d, int64_t v_stride_n,
    const scalar_t* __restrict__ k_norm_weight, const float* __restrict__ cos_sin_cache,
    const int64_t* __restrict__ positions, const int64_t* __restrict__ slots,
    const CacheTable<cache_t> caches, int64_t num_tokens, int d_layers, int kv_heads, int hd,
    int64_t num_slots, int64_t max_pos, float eps) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= num_tokens * d_layers * kv_heads) return;  // uniform across the warp
  const int head = warp % kv_heads;
  const int d = (warp / kv_heads) % d_layers;
  const int64_t n = warp / (static_cast<int64_t>(kv_heads) * d_layers);
  const int64_t slot = slots[n], pos = positions[n];
  CUDA_KERNEL_ASSERT_MSG(slot >= 0 && slot < num_slots, "layer_mix_kv: slot out of range");
  CUDA_KERNEL_ASSERT_MSG(pos >= 0 && pos < max_pos, "layer_mix_kv: position past cos_sin_cache");

  const scalar_t* k_head = k + d * k_stride_d + n * k_stride_n + head * hd;
  float sum_sq = 0.f;
  for (int i = lane; i < hd; i += kWarp) {
    const float x = static_cast<float>(k_head[i]);
    sum_sq += x * x;
  }
  const float r = rsqrtf(warp_sum(sum_sq) / static_cast<float>(hd) + eps);
  const scalar_t* w = k_norm_weight + d * hd;
  const float* cos_sin = cos_sin_cache + pos * hd;
  cache_t* k_out = caches.k[d] + slot * caches.k_slot_stride[d] + head * hd;
  const int half = hd / 2;
  for (int i = lane; i < half; i += kWarp) {
    const scalar_t x1 = w[i] * static_cast<scalar_t>(static_cast<float>(k_head[i]) * r);
    const scalar_t x2 =
        w[half + i] * static_cast<scalar_t>(static_cast<float>(k_head[half + i]) * r);
    // cos/sin are cast to the working dtype first, then rotate-half (apply_rope).
    const auto c = static_cast<scalar_t>(cos_sin[i]);
    const auto s = static_cast<scalar_t>(cos_sin[half + i]);
    k_out[i] = static_cast<cache_t>(static_cast<float>(x1 * c - x2 * s));
    k_out[half + i] = static_cast<cache_t>(static_cast<float>(x2 * c + x1 * s));
  }
  const scalar_t* v_head = v + d * v_stride_d + n * v_stride_n + head * hd;
  cache_t* v_out = caches.v[d] + slot * caches.v_slot_stride[d] + head * hd;
  for (int i = lane; i < hd; i += kWarp) {
    v_out[i] = static_cast<cache_t>(static_cast<float>(v_head[i]));
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
void launch_mix_norm(const at::Tensor& src, const float* probs, const scalar_t* base,
                     const at::Tensor& norm_weight, at::Tensor& ctx, int t_layers, float eps,
                     cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int d_layers = static_cast<int>(ctx.size(0));
  const int64_t num_tokens = ctx.size(1);
  const int h = static_cast<int>(ctx.size(2));
  const bool vectorized = h % kVec == 0 && aligned16(src.data_ptr()) && aligned16(base) &&
                          aligned16(norm_weight.data_ptr()) && aligned16(ctx.data_ptr());
  const int vec = vectorized ? kVec : 1;
  // 256 threads: two 16-byte vectors each at H=4096 in bf16; fewer for narrow rows.
  const int threads = std::min(256, (h / vec + kWarp - 1) / kWarp * kWarp);
  auto launch = [&](auto mix_norm) {
    DFLARE_LAUNCH(mix_norm, static_cast<unsigned>(num_tokens), threads, stream,
                  src.data_ptr<scalar_t>(), probs, base, norm_weight.data_ptr<scalar_t>(),
                  ctx.data_ptr<scalar_t>(), num_tokens, t_layers, d_layers, h, eps);
  };
  if (vectorized) {
    launch(mix_norm_kernel<scalar_t, kVec>);
  } else {
    launch(mix_norm_kernel<scalar_t, 1>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename cache_t>
void launch_rope_store(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_norm_weight,
                       const at::Tensor& cos_sin_cache, const at::Tensor& positions,
                       const at::Tensor& slots, at::TensorList k_caches, at::TensorList v_caches,
                       float eps, cudaStream_t stream) {
  CacheTable<cache_t> table{};
  for (size_t d = 0; d < k_caches.size(); ++d) {
    table.k[d] = k_caches[d].data_ptr<cache_t>();
    table.v[d] = v_caches[d].data_ptr<cache_t>();
    table.k_slot_stride[d] = k_caches[d].stride(0);
    table.v_slot_stride[d] = v_caches[d].stride(0);
  }
  const int64_t num_tokens = k.size(1);
  const int d_layers = static_cast<int>(k.size(0));
  const int hd = static_cast<int>(k_norm_weight.size(1));
  const int kv_heads = static_cast<int>(k.size(2) / hd);
  constexpr int kThreads = 256;
  const int64_t warps = num_tokens * d_layers * kv_heads;
  const int64_t blocks = (warps * kWarp + kThreads - 1) / kThreads;
  const auto rope_store = rope_store_kernel<scalar_t, cache_t>;
  DFLARE_LAUNCH(rope_store, static_cast<unsigned>(blocks), kThreads, stream,
                k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), v.data_ptr<scalar_t>(),
                v.stride(0), v.stride(1), k_norm_weight.data_ptr<scalar_t>(),
                cos_sin_cache.data_ptr<float>(), positions.data_ptr<int64_t>(),
                slots.data_ptr<int64_t>(), table, num_tokens, d_layers, kv_heads, hd,
                k_caches[0].size(0), cos_sin_cache.size(0), eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void layer_mix_kv_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& fusion_probs,
                       const std::optional<at::Tensor>& fc_weight,
                       const at::Tensor& hidden_norm_weight, const at::Tensor& k_proj_weight,
                       const at::Tensor& v_proj_weight,
                       const std::optional<at::Tensor>& k_proj_bias,
                       const std::optional<at::Tensor>& v_proj_bias,
                       const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions,
                       const at::Tensor& cos_sin_cache, const at::Tensor& slots,
                       at::TensorList k_caches, at::TensorList v_caches) {
  check_layer_mix_kv_args(hidden, fusion_probs, fc_weight, hidden_norm_weight, k_proj_weight,
                          v_proj_weight, k_proj_bias, v_proj_bias, k_norm_weight, positions,
                          cos_sin_cache, slots, k_caches, v_caches);
  const int64_t n = hidden.size(0), t = hidden.size(1), h = hidden.size(2);
  const int64_t d = k_proj_weight.size(0);
  TORCH_CHECK(d <= kMaxLayers, "layer_mix_kv: the CUDA kernel supports up to ", kMaxLayers,
              " draft layers, got ", d);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float eps_f = static_cast<float>(eps);
  const float* probs = fusion_probs ? fusion_probs->data_ptr<float>() : nullptr;
  const int src_layers = static_cast<int>(fusion_probs ? t : 1);

  // Long prefills go tile by tile: the temporaries (fc output, contexts [D, tile, H], projected
  // K/V) stay bounded (~0.2 GB at Qwen3-8B sizes, not ~0.7 GB at N = 8192), and the three
  // steps of a tile are the same as of a whole short call.
  for (int64_t n0 = 0; n0 < n; n0 += kTileTokens) {
    const int64_t len = std::min(kTileTokens, n - n0);
    const at::Tensor tile = hidden.narrow(0, n0, len);
    // DFlash mixes with its fc GEMM first; the kernel then only normalises that one context.
    // DFly adds that GEMM's output to each layer's mix (base) before the norm.
    const at::Tensor fc_out =
        fc_weight ? at::linear(tile.view({len, t * h}), *fc_weight) : at::Tensor();
    const at::Tensor src = fusion_probs ? tile : fc_out;
    at::Tensor ctx = at::empty({fusion_probs ? d : 1, len, h}, hidden.options());
    // clang-format off
    AT_DISPATCH_V2(hidden.scalar_type(), "layer_mix_kv_cuda", AT_WRAP([&] {
      const scalar_t* base =
          fusion_probs && fc_weight ? fc_out.data_ptr<scalar_t>() : nullptr;
      launch_mix_norm<scalar_t>(src, probs, base, hidden_norm_weight, ctx, src_layers, eps_f,
                                stream);
    }), at::kFloat, at::kBFloat16, at::kHalf);
    // clang-format on

    const auto [k, v] =
        project_layer_mix_kv(ctx, k_proj_weight, v_proj_weight, k_proj_bias, v_proj_bias);
    const at::Tensor tile_positions = positions.narrow(0, n0, len);
    const at::Tensor tile_slots = slots.narrow(0, n0, len);

    // clang-format off
    AT_DISPATCH_V2(hidden.scalar_type(), "layer_mix_kv_cuda", AT_WRAP([&] {
      using hidden_t = scalar_t;
      AT_DISPATCH_V2(k_caches[0].scalar_type(), "layer_mix_kv_cuda", AT_WRAP([&] {
        launch_rope_store<hidden_t, scalar_t>(k, v, k_norm_weight, cos_sin_cache, tile_positions,
                                              tile_slots, k_caches, v_caches, eps_f, stream);
      }), at::kFloat, at::kBFloat16, at::kHalf, at::kFloat8_e4m3fn, at::kFloat8_e5m2);
    }), at::kFloat, at::kBFloat16, at::kHalf);
    // clang-format on
  }
}

}  // namespace dflare
