// The one registration file: schemas of torch.ops.dflare.* and their CPU / CUDA kernels.
// Registering through TORCH_LIBRARY (not plain pybind functions) makes the ops visible to
// torch.compile, to CUDA graph capture and to the dispatcher's device routing.
#include "dflare_ops.h"

TORCH_LIBRARY(dflare, m) {
  // Mix the captured target layers per draft layer, hidden_norm, project to each draft
  // layer's context K/V, k_norm, RoPE, and store at `slots` of every layer's paged cache.
  // fusion_probs [D, T] (DFlare), fc_weight [H, T*H] (DFlash), or both (DFly).
  m.def(
      "layer_mix_kv(Tensor hidden, Tensor? fusion_probs, Tensor? fc_weight, "
      "Tensor hidden_norm_weight, Tensor k_proj_weight, Tensor v_proj_weight, "
      "Tensor? k_proj_bias, Tensor? v_proj_bias, Tensor k_norm_weight, float eps, "
      "Tensor positions, Tensor cos_sin_cache, Tensor slots, "
      "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches) -> ()");
  // Tree-free verification of one drafted block per request: accept lengths, committed
  // tokens (accepted + bonus), new sequence lengths and the KV slots to free.
  m.def(
      "verify_block(Tensor draft_tokens, Tensor logits, Tensor seq_lens, Tensor remaining, "
      "Tensor temperatures, Tensor top_k, Tensor top_p, Tensor seeds, Tensor stop_token_ids, "
      "Tensor block_slots) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // y = x weight^T (+ bias) for a few rows of x (1 to 8, float32), reading weight once:
  // the target's linears in a CPU decode step or verify pass. CPU only; GPUs use cuBLAS.
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(dflare, CPU, m) {
  m.impl("layer_mix_kv", &dflare::layer_mix_kv_cpu);
  m.impl("verify_block", &dflare::verify_block_cpu);
  m.impl("skinny_linear", &dflare::skinny_linear_cpu);
}

#ifdef DFLARE_WITH_CUDA
TORCH_LIBRARY_IMPL(dflare, CUDA, m) {
  m.impl("layer_mix_kv", &dflare::layer_mix_kv_cuda);
  m.impl("verify_block", &dflare::verify_block_cuda);
}
#endif

// The shared object is imported as the Python module dflare_sgl._C; importing it runs the
// registrations above. It exports no Python functions of its own.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
