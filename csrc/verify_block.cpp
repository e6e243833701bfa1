// CPU kernel of torch.ops.dflare.verify_block. The exact rules (greedy ties, tie-inclusive
// top-k / top-p with fixed-point mass, Philox Gumbel noise) are documented, and defined in
// plain PyTorch, in dflare_sgl/verify.py; this twin reproduces them token for token.
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "dflare_ops.h"
#include "philox.h"

namespace dflare {

// Shape/dtype checks shared with the CUDA kernel (verify_block_cuda.cu).
void check_verify_block_args(const at::Tensor& draft_tokens, const at::Tensor& logits,
                             const at::Tensor& seq_lens, const at::Tensor& remaining,
                             const at::Tensor& temperatures, const at::Tensor& top_k,
                             const at::Tensor& top_p, const at::Tensor& seeds,
                             const at::Tensor& stop_token_ids, const at::Tensor& block_slots) {
  TORCH_CHECK(block_slots.dim() == 2 && block_slots.size(1) >= 1,
              "verify_block: block_slots must be [bs, B] with B >= 1");
  const int64_t bs = block_slots.size(0), B = block_slots.size(1);
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == bs * B && logits.size(1) >= 1,
              "verify_block: logits must be [bs*B, V]");
  TORCH_CHECK(logits.stride(1) == 1, "verify_block: logits need unit stride along V");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "verify_block: logits must be float32, bfloat16 or float16");
  TORCH_CHECK(
      draft_tokens.dim() == 2 && draft_tokens.size(0) == bs && draft_tokens.size(1) == B - 1,
      "verify_block: draft_tokens must be [bs, B-1]");
  TORCH_CHECK(stop_token_ids.dim() == 2 && stop_token_ids.size(0) == bs,
              "verify_block: stop_token_ids must be [bs, S]");
  for (const at::Tensor* t :
       {&draft_tokens, &seq_lens, &remaining, &top_k, &seeds, &stop_token_ids, &block_slots}) {
    TORCH_CHECK(t->scalar_type() == at::kLong,
                "verify_block: token, length, top_k, seed and slot tensors must be int64");
  }
  for (const at::Tensor* t : {&temperatures, &top_p}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat,
                "verify_block: temperatures and top_p must be float32");
  }
  for (const at::Tensor* t : {&seq_lens, &remaining, &temperatures, &top_k, &top_p, &seeds}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == bs, "verify_block: per-request inputs must be [bs]");
  }
  for (const at::Tensor* t : {&draft_tokens, &seq_lens, &remaining, &temperatures, &top_k, &top_p,
                              &seeds, &stop_token_ids, &block_slots}) {
    TORCH_CHECK(t->device() == logits.device(), "verify_block: all inputs must be on ",
                logits.device());
  }
}

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct RowSampling {
  float temperature;
  int64_t top_k;
  float top_p;
  uint64_t seed;
  uint64_t pos;

  bool greedy() const { return !(temperature > 0.f); }
  bool top_k_on(int64_t vocab) const { return top_k > 0 && top_k < vocab; }
  bool top_p_on() const { return top_p < 1.f; }
};

template <typename T>
int64_t greedy_token(const T* x, int64_t vocab) {
  int64_t best = 0;
  float best_val = -kInf;
  for (int64_t v = 0; v < vocab; ++v) {
    const float f = static_cast<float>(x[v]);
    if (f > best_val) {  // strict: the lowest index wins ties
      best_val = f;
      best = v;
    }
  }
  return best;
}

// Smallest kept scaled logit under tie-inclusive top-k then top-p (the kept set is always
// {v : z_v >= threshold}).
float filter_threshold(const std::vector<float>& z, const RowSampling& s) {
  float threshold = -kInf;
  if (s.top_k_on(static_cast<int64_t>(z.size()))) {
    // #{u : z_u > z_v} < k  <=>  z_v >= the k-th largest value (counted with multiplicity).
    std::vector<float> scratch(z);
    std::nth_element(scratch.begin(), scratch.begin() + (s.top_k - 1), scratch.end(),
                     std::greater<float>());
    threshold = scratch[s.top_k - 1];
  }
  if (!s.top_p_on()) return threshold;

  const double z_max = *std::max_element(z.begin(), z.end());
  std::vector<std::pair<float, uint64_t>> heavy;  // (z, mass) of kept tokens with mass > 0
  uint64_t total = 0;
  for (const float zv : z) {
    if (!(zv >= threshold)) continue;
    const uint64_t mass = top_p_mass(static_cast<double>(zv) - z_max);
    if (mass == 0) continue;
    heavy.emplace_back(zv, mass);
    total += mass;
  }
  const uint64_t limit = top_p_limit(s.top_p, total);
  std::sort(heavy.begin(), heavy.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  // Walk tie groups from the top; a group is kept while the mass strictly above it is below
  // the limit. Zero-mass tokens lie below every heavy one, their mass above is the whole
  // total >= limit (top_p < 1), so they are dropped and need no sorting.
  uint64_t above = 0;
  for (size_t j = 0; j < heavy.size() && above < limit;) {
    threshold = heavy[j].first;
    for (; j < heavy.size() && heavy[j].first == threshold; ++j) above += heavy[j].second;
  }
  return threshold;
}

template <typename T>
int64_t sampled_token(const T* x, int64_t vocab, const RowSampling& s, std::vector<float>& z) {
  float threshold = -kInf;
  if (s.top_k_on(vocab) || s.top_p_on()) {
    z.resize(vocab);
    for (int64_t v = 0; v < vocab; ++v) z[v] = static_cast<float>(x[v]) / s.temperature;
    threshold = filter_threshold(z, s);
  }
  int64_t best = 0;
  float best_score = -kInf;
  uint32_t cached_block = std::numeric_limits<uint32_t>::max();
  Philox4 noise{};
  for (int64_t v = 0; v < vocab; ++v) {
    const float zv = static_cast<float>(x[v]) / s.temperature;
    if (!(zv >= threshold) || zv + kGumbelMax < best_score) continue;
    const uint32_t block = static_cast<uint32_t>(v >> 2);
    if (block != cached_block) {  // one Philox call serves 4 consecutive vocab ids
      noise = noise_block(s.seed, s.pos, block);
      cached_block = block;
    }
    const float score = zv + gumbel_from_word(noise.word(static_cast<uint32_t>(v & 3)));
    if (score > best_score) {
      best_score = score;
      best = v;
    }
  }
  return best;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_block_cpu(
    const at::Tensor& draft_tokens, const at::Tensor& logits, const at::Tensor& seq_lens,
    const at::Tensor& remaining, const at::Tensor& temperatures, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seeds, const at::Tensor& stop_token_ids,
    const at::Tensor& block_slots) {
  check_verify_block_args(draft_tokens, logits, seq_lens, remaining, temperatures, top_k, top_p,
                          seeds, stop_token_ids, block_slots);
  TORCH_CHECK(logits.device().is_cpu(), "verify_block_cpu: inputs must be on the CPU");
  const int64_t bs = block_slots.size(0), B = block_slots.size(1), vocab = logits.size(1);
  const int64_t num_stops = stop_token_ids.size(1), row_stride = logits.stride(0);

  const auto draft = draft_tokens.contiguous(), lens = seq_lens.contiguous();
  const auto budget = remaining.contiguous(), temps = temperatures.contiguous();
  const auto ks = top_k.contiguous(), ps = top_p.contiguous(), keys = seeds.contiguous();
  const auto stops = stop_token_ids.contiguous(), slots = block_slots.contiguous();
  const int64_t* lens_p = lens.data_ptr<int64_t>();
  const float* temps_p = temps.data_ptr<float>();
  const int64_t* ks_p = ks.data_ptr<int64_t>();
  const float* ps_p = ps.data_ptr<float>();
  const int64_t* keys_p = keys.data_ptr<int64_t>();

  // Target token of every logits row; rows are independent, so they run in parallel.
  std::vector<int64_t> target(bs * B);
  AT_DISPATCH_V2(
      logits.scalar_type(), "verify_block_cpu", AT_WRAP([&] {
        const scalar_t* base = logits.data_ptr<scalar_t>();
        at::parallel_for(0, bs * B, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> z;  // per-thread scratch for filtered rows
          for (int64_t row = begin; row < end; ++row) {
            const int64_t i = row / B;
            const RowSampling s{temps_p[i], ks_p[i], ps_p[i], static_cast<uint64_t>(keys_p[i]),
                                static_cast<uint64_t>(lens_p[i] + row % B)};
            const scalar_t* x = base + row * row_stride;
            target[row] = s.greedy() ? greedy_token(x, vocab) : sampled_token(x, vocab, s, z);
          }
        });
      }),
      at::kFloat, at::kBFloat16, at::kHalf);

  auto opts = block_slots.options();
  auto accept_lens = at::empty({bs}, opts), num_committed = at::empty({bs}, opts);
  auto new_seq_lens = at::empty({bs}, opts);
  auto committed = at::empty({bs, B}, opts), free_slots = at::empty({bs, B}, opts);
  const int64_t* draft_p = draft.data_ptr<int64_t>();
  const int64_t* budget_p = budget.data_ptr<int64_t>();
  const int64_t* stops_p = stops.data_ptr<int64_t>();
  const int64_t* slots_p = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < bs; ++i) {
    const int64_t* t = target.data() + i * B;
    int64_t a = 0;
    while (a < B - 1 && draft_p[i * (B - 1) + a] == t[a]) ++a;
    // Committed t_0 .. t_a, cut after the first stop token, then to the remaining budget.
    int64_t n = a + 1;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t* stop = stops_p + i * num_stops;
      if (std::find(stop, stop + num_stops, t[j]) != stop + num_stops) n = j + 1;
    }
    n = std::min(n, std::max<int64_t>(budget_p[i], 0));
    accept_lens.data_ptr<int64_t>()[i] = a;
    num_committed.data_ptr<int64_t>()[i] = n;
    new_seq_lens.data_ptr<int64_t>()[i] = lens_p[i] + n;
    for (int64_t k = 0; k < B; ++k) {
      committed.data_ptr<int64_t>()[i * B + k] = k < n ? t[k] : -1;
      free_slots.data_ptr<int64_t>()[i * B + k] = k < n ? -1 : slots_p[i * B + k];
    }
  }
  return {accept_lens, committed, num_committed, new_seq_lens, free_slots};
}

}  // namespace dflare
