// Declarations of the dflare ops' per-device kernels. The schemas (argument meaning,
// shapes, dtypes) are documented once, in ops.cpp and in the Python wrappers
// dflare_sgl/layer_mix.py, dflare_sgl/verify.py and dflare_sgl/skinny_linear.py.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace dflare {

void layer_mix_kv_cpu(const at::Tensor& hidden, const std::optional<at::Tensor>& fusion_probs,
                      const std::optional<at::Tensor>& fc_weight,
                      const at::Tensor& hidden_norm_weight, const at::Tensor& k_proj_weight,
                      const at::Tensor& v_proj_weight,
                      const std::optional<at::Tensor>& k_proj_bias,
                      const std::optional<at::Tensor>& v_proj_bias,
                      const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions,
                      const at::Tensor& cos_sin_cache, const at::Tensor& slots,
                      at::TensorList k_caches, at::TensorList v_caches);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_block_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& logits, const at::Tensor& seq_lens,
    const at::Tensor& remaining, const at::Tensor& temperatures, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seeds, const at::Tensor& stop_token_ids,
    const at::Tensor& block_slots);

// Most rows of x skinny_linear takes (a verify pass of up to 8 tokens); more go to a GEMM.
constexpr int64_t kSkinnyLinearMaxRows = 8;
at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias);

// Device-independent pieces of layer_mix_kv (layer_mix_kv.cpp), shared with the CUDA kernel.
void check_layer_mix_kv_args(
    const at::Tensor& hidden, const std::optional<at::Tensor>& fusion_probs,
    const std::optional<at::Tensor>& fc_weight, const at::Tensor& hidden_norm_weight,
    const at::Tensor& k_proj_weight, const at::Tensor& v_proj_weight,
    const std::optional<at::Tensor>& k_proj_bias, const std::optional<at::Tensor>& v_proj_bias,
    const at::Tensor& k_norm_weight, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
    const at::Tensor& slots, at::TensorList k_caches, at::TensorList v_caches);
std::pair<at::Tensor, at::Tensor> project_layer_mix_kv(const at::Tensor& ctx,
                                                      const at::Tensor& k_weight,
                                                      const at::Tensor& v_weight,
                                                      const std::optional<at::Tensor>& k_bias,
                                                      const std::optional<at::Tensor>& v_bias);

// Argument checks of verify_block (verify_block.cpp), shared with the CUDA kernel.
void check_verify_block_args(const at::Tensor& draft_tokens, const at::Tensor& logits,
                             const at::Tensor& seq_lens, const at::Tensor& remaining,
                             const at::Tensor& temperatures, const at::Tensor& top_k,
                             const at::Tensor& top_p, const at::Tensor& seeds,
                             const at::Tensor& stop_token_ids, const at::Tensor& block_slots);

#ifdef DFLARE_WITH_CUDA
// Kernel launches go through this macro so that the test-only CPU emulation of the CUDA
// execution model (python_tests/cuda_emulation), which defines it first, runs the kernels'
// source unchanged.
#if defined(__CUDACC__) && !defined(DFLARE_LAUNCH)
#define DFLARE_LAUNCH(kernel, grid, threads, stream, ...) \
  kernel<<<grid, threads, 0, stream>>>(__VA_ARGS__)
#endif

void layer_mix_kv_cuda(const at::Tensor& hidden, const std::optional<at::Tensor>& fusion_probs,
                       const std::optional<at::Tensor>& fc_weight,
                       const at::Tensor& hidden_norm_weight, const at::Tensor& k_proj_weight,
                       const at::Tensor& v_proj_weight,
                       const std::optional<at::Tensor>& k_proj_bias,
                       const std::optional<at::Tensor>& v_proj_bias,
                       const at::Tensor& k_norm_weight, double eps, const at::Tensor& positions,
                       const at::Tensor& cos_sin_cache, const at::Tensor& slots,
                       at::TensorList k_caches, at::TensorList v_caches);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_block_cuda(
    const at::Tensor& draft_tokens, const at::Tensor& logits, const at::Tensor& seq_lens,
    const at::Tensor& remaining, const at::Tensor& temperatures, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seeds, const at::Tensor& stop_token_ids,
    const at::Tensor& block_slots);
#endif

}  // namespace dflare
