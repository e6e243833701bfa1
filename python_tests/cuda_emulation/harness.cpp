// Test-only: csrc's CUDA kernels, their host code included, compiled for the CPU emulation of
// the CUDA execution model (cuda_emulation.h) and exposed to the tests as plain functions on
// CPU tensors. Built by python_tests/cuda_emulator.py with the namespace renamed
// (-Ddflare=dflare_emulated) so nothing clashes with the real extension.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>

#include <fstream>
#include <iterator>
#include <string_view>
#include <torch/extension.h>

#include "cuda_emulation.h"
#include "faulty_kernels.h"
// The kernels, unchanged.
#include "layer_mix_kv_cuda.cu"
#include "verify_block_cuda.cu"

namespace {

// The emulator's shared memory is this module's writable static storage.
void find_shared_range() {
  auto visit = [](dl_phdr_info* info, size_t, void*) -> int {
    const auto target = reinterpret_cast<uintptr_t>(&cuda_emu::g_runtime);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
      const ElfW(Phdr)& ph = info->dlpi_phdr[i];
      const uintptr_t begin = info->dlpi_addr + ph.p_vaddr, end = begin + ph.p_memsz;
      if (ph.p_type == PT_LOAD && (ph.p_flags & PF_W) && target >= begin && target < end) {
        cuda_emu::g_runtime.shared_begin = begin;
        cuda_emu::g_runtime.shared_end = end;
        return 1;
      }
    }
    return 0;
  };
  TORCH_CHECK(dl_iterate_phdr(visit, nullptr) == 1, "CUDA emulation: module segment not found");
}

// The kernels' __shared__ variables: function-local statics (mangled "_ZZ...") of the emulated
// namespaces, read from the module's ELF symbol table (they are local symbols, which the
// dynamic linker does not list).
void find_shared_variables() {
  Dl_info info;
  TORCH_CHECK(dladdr(reinterpret_cast<void*>(&cuda_emu::g_runtime), &info) && info.dli_fname,
              "CUDA emulation: module not found");
  std::ifstream file(info.dli_fname, std::ios::binary);
  const std::vector<char> elf((std::istreambuf_iterator<char>(file)), {});
  const auto* header = reinterpret_cast<const ElfW(Ehdr)*>(elf.data());
  const auto* sections = reinterpret_cast<const ElfW(Shdr)*>(elf.data() + header->e_shoff);
  for (int i = 0; i < header->e_shnum; ++i) {
    if (sections[i].sh_type != SHT_SYMTAB) continue;
    const auto* symbols = reinterpret_cast<const ElfW(Sym)*>(elf.data() + sections[i].sh_offset);
    const char* names = elf.data() + sections[sections[i].sh_link].sh_offset;
    for (size_t j = 0; j < sections[i].sh_size / sizeof(ElfW(Sym)); ++j) {
      const std::string_view name = names + symbols[j].st_name;
      if (ELF64_ST_TYPE(symbols[j].st_info) != STT_OBJECT || !name.starts_with("_ZZ") ||
          (name.find("dflare_emulated") == name.npos && name.find("6faulty") == name.npos)) {
        continue;
      }
      cuda_emu::g_runtime.shared_variables.emplace_back(
          reinterpret_cast<uintptr_t>(info.dli_fbase) + symbols[j].st_value, symbols[j].st_size);
    }
  }
  TORCH_CHECK(!cuda_emu::g_runtime.shared_variables.empty(),
              "CUDA emulation: no __shared__ variables in the symbol table (stripped module?)");
}

void watch(const std::string& name, const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  cuda_emu::g_runtime.buffers.push_back({name, begin, begin + t.storage().nbytes()});
}

void watch(const std::string& name, const std::optional<at::Tensor>& t) {
  if (t) watch(name, *t);
}

void configure(int64_t multiprocessors, int64_t ctas_per_sm, int64_t block_order_seed) {
  auto& r = cuda_emu::g_runtime;
  r.multiprocessors = static_cast<int>(multiprocessors);
  r.ctas_per_sm = static_cast<int>(ctas_per_sm);
  r.block_order_seed = static_cast<uint64_t>(block_order_seed);
}

// The launches of the last call: kernel, grid, block, and global bytes read / written per
// watched buffer (plus everything else, under "other").
pybind11::list launches() {
  pybind11::list out;
  for (const auto& l : cuda_emu::g_runtime.launches) {
    pybind11::dict bytes;
    for (const auto& b : l.buffers) bytes[b.name.c_str()] = pybind11::make_tuple(b.read, b.written);
    bytes["other"] = pybind11::make_tuple(l.other_read, l.other_written);
    out.append(pybind11::dict(pybind11::arg("kernel") = l.kernel, pybind11::arg("grid") = l.grid,
                              pybind11::arg("block") = l.block, pybind11::arg("bytes") = bytes));
  }
  return out;
}

void start_call() {
  cuda_emu::g_runtime.buffers.clear();
  cuda_emu::g_runtime.launches.clear();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_block(
    const at::Tensor& draft_tokens, const at::Tensor& logits, const at::Tensor& seq_lens,
    const at::Tensor& remaining, const at::Tensor& temperatures, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seeds, const at::Tensor& stop_token_ids,
    const at::Tensor& block_slots) {
  start_call();
  watch("logits", logits);
  const std::pair<const char*, const at::Tensor*> small_inputs[] = {
      {"draft_tokens", &draft_tokens}, {"seq_lens", &seq_lens},        {"remaining", &remaining},
      {"temperatures", &temperatures}, {"top_k", &top_k},              {"top_p", &top_p},
      {"seeds", &seeds},               {"stop_token_ids", &stop_token_ids},
      {"block_slots", &block_slots}};
  for (const auto& [name, t] : small_inputs) watch(name, *t);
  return dflare::verify_block_cuda(draft_tokens, logits, seq_lens, remaining, temperatures, top_k,
                                   top_p, seeds, stop_token_ids, block_slots);
}

void layer_mix_kv(const at::Tensor& hidden, const std::optional<at::Tensor>& fusion_probs,
                  const std::optional<at::Tensor>& fc_weight, const at::Tensor& hidden_norm_weight,
                  const at::Tensor& k_proj_weight, const at::Tensor& v_proj_weight,
                  const std::optional<at::Tensor>& k_proj_bias,
                  const std::optional<at::Tensor>& v_proj_bias, const at::Tensor& k_norm_weight,
                  double eps, const at::Tensor& positions, const at::Tensor& cos_sin_cache,
                  const at::Tensor& slots, std::vector<at::Tensor> k_caches,
                  std::vector<at::Tensor> v_caches) {
  start_call();
  watch("hidden", hidden);
  watch("fusion_probs", fusion_probs);
  watch("hidden_norm_weight", hidden_norm_weight);
  watch("k_norm_weight", k_norm_weight);
  watch("positions", positions);
  watch("cos_sin_cache", cos_sin_cache);
  watch("slots", slots);
  for (size_t d = 0; d < k_caches.size(); ++d) {
    watch("k_cache." + std::to_string(d), k_caches[d]);
    watch("v_cache." + std::to_string(d), v_caches[d]);
  }
  dflare::layer_mix_kv_cuda(hidden, fusion_probs, fc_weight, hidden_norm_weight, k_proj_weight,
                            v_proj_weight, k_proj_bias, v_proj_bias, k_norm_weight, eps, positions,
                            cos_sin_cache, slots, k_caches, v_caches);
}

// Runs one of faulty_kernels.h's kernels on out (int32) with `grid` blocks of `threads`.
void run_test_kernel(const std::string& name, at::Tensor out, int64_t grid, int64_t threads) {
  TORCH_CHECK(out.scalar_type() == at::kInt && out.is_contiguous(), "out: contiguous int32");
  start_call();
  watch("out", out);
  faulty::run(name, out.data_ptr<int>(), static_cast<unsigned>(grid),
              static_cast<unsigned>(threads));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  find_shared_range();
  find_shared_variables();
  m.def("configure", &configure, "multiprocessors, CTAs per SM the host code sees; block order");
  m.def("launches", &launches, "the last call's launches and their global-memory bytes");
  m.def("verify_block", &verify_block);
  m.def("layer_mix_kv", &layer_mix_kv);
  m.def("run_test_kernel", &run_test_kernel,
        "a kernel of faulty_kernels.h, for the emulator's tests");
}
