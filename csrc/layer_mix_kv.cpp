// layer_mix_kv on the CPU, and the device-independent pieces the CUDA kernel shares.
//
// The definition is dflare_sgl/layer_mix.py (context_kv, layer_mix_kv_reference). Tokens are
// processed in blocks, one or more per thread: for a block, every token's [T, H] hidden
// states are read once to build all D normalised contexts, the K and V projections of the
// whole block run as GEMMs (oneDNN / MKL through ATen), then k_norm, RoPE, the cast to the
// cache dtype and the scatter into the paged caches run while the block is still in cache.
//
// Numerics follow the reference op by op: reductions accumulate in float32, and every
// elementwise step on scalar_t values rounds to scalar_t, which is exactly what c10::Half /
// c10::BFloat16 arithmetic does (each operator computes in float and rounds back).
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dflare_ops.h"

namespace dflare {

namespace {

bool is_supported_hidden_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

bool is_supported_cache_dtype(at::ScalarType t) {
  return is_supported_hidden_dtype(t) || t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

// per_layer: a projection weight [D, O, H] (or bias [D, O]) need only be dense within each
// layer, the stride between layers is free, so the D layers may be views into fused
// per-layer tensors (a serving engine's qkv_proj) without a copy.
void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                  at::ScalarType dtype, const at::Device& device, bool per_layer = false) {
  TORCH_CHECK(t.sizes() == shape, "layer_mix_kv: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "layer_mix_kv: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, "layer_mix_kv: ", name, " is on ", t.device(),
              " but hidden is on ", device);
  if (per_layer) {
    TORCH_CHECK(t.size(0) == 0 || t[0].is_contiguous(), "layer_mix_kv: ", name,
                " must be dense within each layer (the stride between layers is free)");
  } else {
    TORCH_CHECK(t.is_contiguous(), "layer_mix_kv: ", name, " must be contiguous");
  }
}

void check_caches(at::TensorList caches, const char* name, int64_t num_layers,
                  const at::Tensor& like, int64_t kv_heads, int64_t head_dim) {
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == num_layers, "layer_mix_kv: ", name, " has ",
              caches.size(), " tensors, expected one per draft layer (", num_layers, ")");
  for (const at::Tensor& c : caches) {
    TORCH_CHECK(
        c.dim() == 3 && c.size(0) == like.size(0) && c.size(1) == kv_heads && c.size(2) == head_dim,
        "layer_mix_kv: ", name, " tensors must be [num_slots, ", kv_heads, ", ", head_dim,
        "] (all of one num_slots), got ", c.sizes());
    TORCH_CHECK(c.scalar_type() == like.scalar_type(),
                "layer_mix_kv: every K and V cache must share one dtype");
    TORCH_CHECK(c.device() == like.device(), "layer_mix_kv: every cache must be on ",
                like.device());
    // Rows may be strided (e.g. K and V interleaved in one buffer); a row must be dense.
    TORCH_CHECK(c.stride(2) == 1 && c.stride(1) == head_dim,
                "layer_mix_kv: each cache row [kv_heads, head_dim] must be contiguous");
  }
}

}  // namespace

// Validates every argument of the op; shared by the CPU and CUDA kernels.
void check_layer_mix_kv_args(
    const at::Tensor& hidden, const std::optional<at::Tensor>& fusion_probs,
    const std::optional<at::Tensor>& fc_weight, const at::Tensor& hidden_norm_weight,
    const at::Tensor& k_proj_weight, const at::Tensor& v_proj_weight,
    const std::optional<at::Tensor>& k_proj_bias, const std::optional<at::Tensor>& v_proj_bias,
    const at::Tensor& k_norm_weight, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
    const at::Tensor& slots, at::TensorList k_caches, at::TensorList v_caches) {
  TORCH_CHECK(hidden.dim() == 3, "layer_mix_kv: hidden must be [N, T, H], got ", hidden.sizes());
  TORCH_CHECK(is_supported_hidden_dtype(hidden.scalar_type()),
              "layer_mix_kv: hidden must be float32, bfloat16 or float16, got ",
              hidden.scalar_type());
  TORCH_CHECK(hidden.is_contiguous(), "layer_mix_kv: hidden must be contiguous");
  TORCH_CHECK(fusion_probs.has_value() || fc_weight.has_value(),
              "layer_mix_kv: pass fusion_probs (DFlare), fc_weight (DFlash) or both (DFly)");
  TORCH_CHECK(k_proj_weight.dim() == 3 && k_norm_weight.dim() == 2,
              "layer_mix_kv: k_proj_weight must be [D, KVH*hd, H] and k_norm_weight [D, hd]");
  const int64_t n = hidden.size(0), t = hidden.size(1), h = hidden.size(2);
  const int64_t d = k_proj_weight.size(0), o = k_proj_weight.size(1), hd = k_norm_weight.size(1);
  TORCH_CHECK(hd % 2 == 0 && o % hd == 0, "layer_mix_kv: head_dim ", hd,
              " must be even and divide the projection width ", o);
  const auto dtype = hidden.scalar_type();
  const auto device = hidden.device();
  if (fusion_probs) check_tensor(*fusion_probs, "fusion_probs", {d, t}, at::kFloat, device);
  if (fc_weight) check_tensor(*fc_weight, "fc_weight", {h, t * h}, dtype, device);
  check_tensor(hidden_norm_weight, "hidden_norm_weight", {h}, dtype, device);
  check_tensor(k_proj_weight, "k_proj_weight", {d, o, h}, dtype, device, /*per_layer=*/true);
  check_tensor(v_proj_weight, "v_proj_weight", {d, o, h}, dtype, device, /*per_layer=*/true);
  if (k_proj_bias) check_tensor(*k_proj_bias, "k_proj_bias", {d, o}, dtype, device, true);
  if (v_proj_bias) check_tensor(*v_proj_bias, "v_proj_bias", {d, o}, dtype, device, true);
  TORCH_CHECK(k_proj_bias.has_value() == v_proj_bias.has_value(),
              "layer_mix_kv: pass both projection biases or neither");
  check_tensor(k_norm_weight, "k_norm_weight", {d, hd}, dtype, device);
  check_tensor(positions, "positions", {n}, at::kLong, device);
  check_tensor(slots, "slots", {n}, at::kLong, device);
  TORCH_CHECK(cos_sin_cache.dim() == 2, "layer_mix_kv: cos_sin_cache must be [max_pos, hd]");
  check_tensor(cos_sin_cache, "cos_sin_cache", {cos_sin_cache.size(0), hd}, at::kFloat, device);
  TORCH_CHECK(!k_caches.empty() && is_supported_cache_dtype(k_caches[0].scalar_type()),
              "layer_mix_kv: caches must be float32, bfloat16, float16 or float8 (e4m3fn/e5m2)");
  check_caches(k_caches, "k_caches", d, k_caches[0], o / hd, hd);
  check_caches(v_caches, "v_caches", d, k_caches[0], o / hd, hd);
}

namespace {

// weight [D, R, H] (each layer dense), bias [D, R] or none: ctx [D, n, H] or [1, n, H] ->
// [D, n, R], a view with unit stride in the last dim.
at::Tensor project_context(const at::Tensor& ctx, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  const int64_t d = weight.size(0), r = weight.size(1), h = weight.size(2);
  if (ctx.size(0) == 1) {
    // A shared context (or a single layer): stacking the D weights makes it one GEMM.
    std::optional<at::Tensor> flat_bias;
    if (bias) flat_bias = bias->reshape({d * r});
    return at::linear(ctx[0], weight.reshape({d * r, h}), flat_bias)
        .view({-1, d, r})
        .transpose(0, 1);
  }
  const at::Tensor weight_t = weight.transpose(1, 2);
  return bias ? at::baddbmm(bias->unsqueeze(1), ctx, weight_t) : at::bmm(ctx, weight_t);
}

}  // namespace

// The K and V projections of every draft layer: ctx [D, n, H] (one context per layer,
// DFlare / DFly) or [1, n, H] (one shared context, DFlash) -> K, V [D, n, KVH*hd], views with
// unit stride in the last dim. When each layer's V rows directly follow its K rows in memory
// (a stacked [D, 2, O, H] buffer, or the K and V rows of fused qkv weights), K and V are one
// GEMM that reads each context once; otherwise two, without copying the weights. Shared by
// the CPU and CUDA kernels.
std::pair<at::Tensor, at::Tensor> project_layer_mix_kv(const at::Tensor& ctx,
                                                      const at::Tensor& k_weight,
                                                      const at::Tensor& v_weight,
                                                      const std::optional<at::Tensor>& k_bias,
                                                      const std::optional<at::Tensor>& v_bias) {
  const int64_t d = k_weight.size(0), o = k_weight.size(1), h = k_weight.size(2);
  const bool adjacent =
      v_weight.stride(0) == k_weight.stride(0) &&
      static_cast<const char*>(v_weight.data_ptr()) ==
          static_cast<const char*>(k_weight.data_ptr()) + o * h * k_weight.element_size();
  if (!adjacent) {
    return {project_context(ctx, k_weight, k_bias), project_context(ctx, v_weight, v_bias)};
  }
  std::optional<at::Tensor> bias;
  if (k_bias) bias = at::cat({*k_bias, *v_bias}, 1);  // [D, 2O]: a few KB
  const at::Tensor kv = project_context(
      ctx, k_weight.as_strided({d, 2 * o, h}, {k_weight.stride(0), h, 1}), bias);
  return {kv.narrow(2, 0, o), kv.narrow(2, o, o)};
}

namespace {

// out = weight * (x * rsqrt(mean(x^2) + eps)), the normalised value rounded to scalar_t
// before the weight multiply, as primitives.rms_norm. `out` may alias `x`. The squares are
// summed in double and rounded once: torch (cascade sums) and the CUDA kernel (tree
// reductions) are both within an ulp or so of that exact sum, while a sequential float32 sum
// over thousands of elements drifts far enough to flip bf16 roundings of the output.
template <typename scalar_t>
void rms_norm_row(const scalar_t* x, const scalar_t* weight, int64_t n, float eps, scalar_t* out) {
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<float>(x[i]);
    sum_sq += v * v;
  }
  const float r = 1.f / std::sqrt(static_cast<float>(sum_sq) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = weight[i] * static_cast<scalar_t>(static_cast<float>(x[i]) * r);
  }
}

// ctx[d, j] = hidden_norm(base[j] + sum_t probs[d, t] * hidden[j, t]) for the nb tokens of a
// block; base (DFly's fc output, [nb, H]) may be null (DFlare). probs are rounded to scalar_t
// and the sum accumulated in float32 then rounded once, as the reference's einsum (a GEMM)
// does; base is then added in scalar_t, as the reference's tensor sum. Each token's T hidden
// rows are read once for all layers.
template <typename scalar_t>
void mix_and_norm(const scalar_t* hidden, const float* probs, const scalar_t* base,
                  const scalar_t* norm_weight, int64_t nb, int64_t t_layers, int64_t d_layers,
                  int64_t h, float eps, scalar_t* ctx) {
  std::vector<float> p(d_layers * t_layers);
  for (size_t i = 0; i < p.size(); ++i) {
    p[i] = static_cast<float>(static_cast<scalar_t>(probs[i]));
  }
  std::vector<float> acc(d_layers * h);
  for (int64_t j = 0; j < nb; ++j) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t t = 0; t < t_layers; ++t) {
      const scalar_t* row = hidden + (j * t_layers + t) * h;
      for (int64_t d = 0; d < d_layers; ++d) {
        const float w = p[d * t_layers + t];
        float* a = acc.data() + d * h;
        for (int64_t i = 0; i < h; ++i) a[i] += w * static_cast<float>(row[i]);
      }
    }
    for (int64_t d = 0; d < d_layers; ++d) {
      scalar_t* out = ctx + (d * nb + j) * h;
      const float* a = acc.data() + d * h;
      for (int64_t i = 0; i < h; ++i) out[i] = static_cast<scalar_t>(a[i]);
      if (base != nullptr) {
        for (int64_t i = 0; i < h; ++i) out[i] = out[i] + base[j * h + i];
      }
      rms_norm_row(out, norm_weight, h, eps, out);
    }
  }
}

struct Args {
  const at::Tensor& hidden;
  const std::optional<at::Tensor>& fusion_probs;
  const std::optional<at::Tensor>& fc_weight;
  const at::Tensor& hidden_norm_weight;
  const at::Tensor& k_proj_weight;
  const at::Tensor& v_proj_weight;
  const std::optional<at::Tensor>& k_proj_bias;
  const std::optional<at::Tensor>& v_proj_bias;
  const at::Tensor& k_norm_weight;
  float eps;
  const at::Tensor& positions;
  const at::Tensor& cos_sin_cache;
  const at::Tensor& slots;
  at::TensorList k_caches;
  at::TensorList v_caches;
};

// k_norm + RoPE + cast of one K head row, and the cast of its V row, into the caches.
template <typename scalar_t, typename cache_t>
void store_head(const scalar_t* k, const scalar_t* v, const scalar_t* k_norm_weight,
                const float* cos_sin, int64_t hd, float eps, scalar_t* scratch, cache_t* k_out,
                cache_t* v_out) {
  rms_norm_row(k, k_norm_weight, hd, eps, scratch);
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    // cos/sin are cast to the working dtype first, then rotate-half (apply_rope).
    const auto c = static_cast<scalar_t>(cos_sin[i]);
    const auto s = static_cast<scalar_t>(cos_sin[half + i]);
    const scalar_t x1 = scratch[i], x2 = scratch[half + i];
    k_out[i] = static_cast<cache_t>(static_cast<float>(x1 * c - x2 * s));
    k_out[half + i] = static_cast<cache_t>(static_cast<float>(x2 * c + x1 * s));
  }
  for (int64_t i = 0; i < hd; ++i) v_out[i] = static_cast<cache_t>(static_cast<float>(v[i]));
}

// Tokens [begin, end): contexts, projections, then the per-head epilogue into the caches.
template <typename scalar_t, typename cache_t>
void layer_mix_kv_block(const Args& a, int64_t begin, int64_t end) {
  const int64_t nb = end - begin;
  const int64_t t_layers = a.hidden.size(1), h = a.hidden.size(2);
  const int64_t d_layers = a.k_proj_weight.size(0), hd = a.k_norm_weight.size(1);
  const int64_t kv_heads = a.k_proj_weight.size(1) / hd;
  const at::Tensor hidden = a.hidden.narrow(0, begin, nb);
  const scalar_t* norm_weight = a.hidden_norm_weight.data_ptr<scalar_t>();

  at::Tensor ctx, base;
  if (a.fc_weight) base = at::linear(hidden.view({nb, t_layers * h}), *a.fc_weight);
  if (!a.fusion_probs) {
    ctx = base.unsqueeze(0);
    scalar_t* c = ctx.data_ptr<scalar_t>();
    for (int64_t j = 0; j < nb; ++j) rms_norm_row(c + j * h, norm_weight, h, a.eps, c + j * h);
  } else {
    ctx = at::empty({d_layers, nb, h}, hidden.options());
    mix_and_norm(hidden.data_ptr<scalar_t>(), a.fusion_probs->data_ptr<float>(),
                 base.defined() ? base.data_ptr<scalar_t>() : nullptr, norm_weight, nb, t_layers,
                 d_layers, h, a.eps, ctx.data_ptr<scalar_t>());
  }
  const auto [k, v] = project_layer_mix_kv(ctx, a.k_proj_weight, a.v_proj_weight, a.k_proj_bias,
                                           a.v_proj_bias);

  const int64_t* positions = a.positions.data_ptr<int64_t>() + begin;
  const int64_t* slots = a.slots.data_ptr<int64_t>() + begin;
  const float* cos_sin = a.cos_sin_cache.data_ptr<float>();
  const int64_t max_pos = a.cos_sin_cache.size(0), num_slots = a.k_caches[0].size(0);
  std::vector<scalar_t> scratch(hd);
  for (int64_t j = 0; j < nb; ++j) {
    TORCH_CHECK(slots[j] >= 0 && slots[j] < num_slots, "layer_mix_kv: slot ", slots[j],
                " is outside the caches' ", num_slots, " slots");
    TORCH_CHECK(positions[j] >= 0 && positions[j] < max_pos, "layer_mix_kv: position ",
                positions[j], " is outside cos_sin_cache (", max_pos, " positions)");
  }
  for (int64_t d = 0; d < d_layers; ++d) {
    const scalar_t* k_d = k.data_ptr<scalar_t>() + d * k.stride(0);
    const scalar_t* v_d = v.data_ptr<scalar_t>() + d * v.stride(0);
    const scalar_t* k_norm_weight = a.k_norm_weight.data_ptr<scalar_t>() + d * hd;
    const at::Tensor& k_cache = a.k_caches[d];
    const at::Tensor& v_cache = a.v_caches[d];
    for (int64_t j = 0; j < nb; ++j) {
      cache_t* k_out = k_cache.data_ptr<cache_t>() + slots[j] * k_cache.stride(0);
      cache_t* v_out = v_cache.data_ptr<cache_t>() + slots[j] * v_cache.stride(0);
      for (int64_t head = 0; head < kv_heads; ++head) {
        const int64_t col = head * hd;
        store_head(k_d + j * k.stride(1) + col, v_d + j * v.stride(1) + col, k_norm_weight,
                   cos_sin + positions[j] * hd, hd, a.eps, scratch.data(), k_out + col,
                   v_out + col);
      }
    }
  }
}

template <typename scalar_t, typename cache_t>
void layer_mix_kv_blocks(const Args& a, int64_t block) {
  const int64_t n = a.hidden.size(0);
  if (n <= block) {
    // A single block runs outside parallel_for so that its GEMMs can use every thread.
    layer_mix_kv_block<scalar_t, cache_t>(a, 0, n);
    return;
  }
  // Blocks call ATen ops (the projections), so the worker threads take on the caller's
  // thread-local state: inference / no-grad mode, or those ops would record autograd.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n, block, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t b = begin; b < end; b += block) {
      layer_mix_kv_block<scalar_t, cache_t>(a, b, std::min(end, b + block));
    }
  });
}

}  // namespace

void layer_mix_kv_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& fusion_probs,
                      const std::optional<at::Tensor>& fc_weight,
                      const at::Tensor& hidden_norm_weight, const at::Tensor& k_proj_weight,
                      const at::Tensor& v_proj_weight, const std::optional<at::Tensor>& k_proj_bias,
                      const std::optional<at::Tensor>& v_proj_bias, const at::Tensor& k_norm_weight,
                      double eps, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
                      const at::Tensor& slots, at::TensorList k_caches, at::TensorList v_caches) {
  check_layer_mix_kv_args(hidden, fusion_probs, fc_weight, hidden_norm_weight, k_proj_weight,
                          v_proj_weight, k_proj_bias, v_proj_bias, k_norm_weight, positions,
                          cos_sin_cache, slots, k_caches, v_caches);
  const int64_t n = hidden.size(0);
  if (n == 0) return;
  const Args args{
      hidden,        fusion_probs,  fc_weight,   hidden_norm_weight, k_proj_weight,
      v_proj_weight, k_proj_bias,   v_proj_bias, k_norm_weight,      static_cast<float>(eps),
      positions,     cos_sin_cache, slots,       k_caches,           v_caches};
  // One block per thread, sized so the per-block GEMMs still have enough rows to be
  // efficient and the block's intermediates stay cache-sized.
  constexpr int64_t kMinBlock = 16, kMaxBlock = 256;
  const int64_t threads = at::get_num_threads();
  const int64_t block = std::clamp<int64_t>((n + threads - 1) / threads, kMinBlock, kMaxBlock);
  // clang-format off
  AT_DISPATCH_V2(hidden.scalar_type(), "layer_mix_kv_cpu", AT_WRAP([&] {
    using hidden_t = scalar_t;
    AT_DISPATCH_V2(k_caches[0].scalar_type(), "layer_mix_kv_cpu", AT_WRAP([&] {
      layer_mix_kv_blocks<hidden_t, scalar_t>(args, block);
    }), at::kFloat, at::kBFloat16, at::kHalf, at::kFloat8_e4m3fn, at::kFloat8_e5m2);
  }), at::kFloat, at::kBFloat16, at::kHalf);
  // clang-format on
}

}  // namespace dflare
