// CUDA kernel of torch.ops.dflare.verify_block: the exact rules are documented, and defined
// in plain PyTorch, in dflare_sgl/verify.py; this kernel reproduces them token for token.
//
// Design (one launch, no host sync, CUDA-graph capturable):
//  * The logits read is the whole cost (bs=64, B=16, V=151936 bf16 is ~311 MB), so the grid
//    spreads it evenly: each logits row is split across `splits` CTAs (enough CTAs to fill
//    the GPU even at bs=1), and every row, filtered or not, is read once: each CTA streams
//    its chunk with 16-byte loads.
//  * Greedy and unfiltered sampled rows: each CTA writes one packed (score, index) partial.
//    Rows with top-k / top-p need whole-row thresholds: each CTA keeps the tokens of its
//    chunk with the largest scaled logits as candidates (verify_select.cuh) and bounds the
//    top-p mass of the rest; the row's last CTA selects the thresholds and samples from the
//    candidates, falling back to radix passes over the row only when they cannot decide.
//  * Atomic arrival counters make the last CTA of a row reduce the row, and the last row of
//    a request do the tiny accept / stop / commit logic. Each launch zeroes its own counters
//    (a memset node under CUDA-graph capture), so launches on different streams or devices
//    never share them.
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "dflare_ops.h"
#include "philox.h"
#include "verify_select.cuh"

namespace dflare {

namespace {

struct RowParams {
  float temperature, top_p;
  int64_t top_k;
  uint64_t seed, pos;
  bool greedy, top_k_on, top_p_on;
};

// This thread's best (score, index) over its share of the chunk: the logit itself when
// greedy, else z + Gumbel noise over the tokens with ordered_key(z) >= min_key.
template <typename T, bool kGreedy>
__device__ __forceinline__ u64 thread_best(const RowSpan<T>& span, const Chunk& c,
                                           const RowParams& p, uint32_t min_key) {
  float best = -INFINITY;
  int64_t best_index = 0;
  uint32_t cached_block = 0xFFFFFFFFu;
  Philox4 noise{};
  span.for_each(c, [&](int64_t v, float x) {
    if constexpr (kGreedy) {
      if (x > best) {
        best = x;
        best_index = v;
      }
    } else {
      const float z = x / p.temperature;
      // Skip tokens filtered out, and tokens that cannot beat a score already seen even
      // with the largest noise (saves the Philox and double-precision logs).
      if (ordered_key(z) < min_key || z + kGumbelMax < best) return;
      const uint32_t block = static_cast<uint32_t>(v >> 2);
      if (block != cached_block) {
        noise = noise_block(p.seed, p.pos, block);
        cached_block = block;
      }
      const float score = z + gumbel_from_word(noise.word(static_cast<uint32_t>(v & 3)));
      if (score > best) {
        best = score;
        best_index = v;
      }
    }
  });
  return pack(best, best_index);
}

// Smallest kept key of a whole row under tie-inclusive top-k, then top-p (0: keep everything),
// by radix passes over the row: the exact fallback of a filtered row's candidate selection.
template <typename T>
__device__ uint32_t filter_min_key(const RowSpan<T>& span, const RowParams& p, SharedState& sh) {
  const ScaledRowKeys<T> keys{span, p.temperature};
  uint32_t min_key = 0;
  if (p.top_k_on) {
    // #{u : z_u > z_v} < k  <=>  z_v >= the k-th largest z, the largest x with count(>= x) >= k.
    const u64 k = static_cast<u64>(p.top_k);
    min_key = radix_select(keys, UnitWeight{}, [k](u64) { return k; }, sh);
  }
  if (!p.top_p_on) return min_key;

  // Kept iff (kept mass strictly above) < limit  <=>  z_v >= the largest x with
  // mass(>= x) >= limit, where limit = max(ceil(top_p * total), 1).
  u64 thread_max = 0;
  keys([&](uint32_t key, float, int64_t) { thread_max = umax64(thread_max, key); });
  const double z_max = key_to_float(static_cast<uint32_t>(block_max(thread_max, sh)));
  const float top_p = p.top_p;
  return radix_select(
      keys, TopPWeight{min_key, z_max},
      [=](u64 total) -> u64 { return top_p_limit(top_p, total); }, sh);
}

struct VerifyArgs {
  const int64_t* draft_tokens;
  const void* logits;
  const int64_t *seq_lens, *remaining, *top_k, *seeds, *stop_token_ids, *block_slots;
  const float *temperatures, *top_p;
  int64_t *accept_lens, *committed, *num_committed, *new_seq_lens, *free_slots;
  u64* partials;                 // [bs * B * splits]: each CTA's best (unfiltered rows)
  u64* candidates;               // [bs * B * splits, capacity]: each CTA's (filtered rows)
  CandidateSummary* summaries;   // [bs * B * splits]
  u64* row_best;                 // [bs * B]: each row's sampled (packed) token
  unsigned int* row_arrivals;    // [bs * B], zero at launch: CTAs of the row that finished
  unsigned int* arrivals;        // [bs], zero at launch: rows of the request that finished
  int64_t row_stride, vocab, num_stops;
  int block, splits, capacity;
};

// Relative error bound of a dropped-mass estimate (DroppedMass): the float z - max_z rounds
// by < 1.4e-6 of the exponent (|dz| <= 23), expf errs by 2 ulp, the double sums and
// rescalings by far less.
constexpr double kDroppedMassError = 1e-5;

// Candidates a filtered row keeps over all its CTAs, and at least per CTA.
constexpr int64_t kRowCandidates = 2048;
constexpr int64_t kMinCandidates = 64;

// The row's last CTA, for a filtered row: the thresholds and the Gumbel-max from the
// candidates every CTA of the row collected. Exact whenever the kept set lies where the
// candidates are complete (every token with key >= the largest admission cut is one) and,
// for top-p without top-k, the bounds on the dropped mass give one threshold; otherwise the
// radix passes over the whole row decide (counted by the tests, rare on LM-shaped rows).
template <typename T>
__device__ u64 select_filtered_row(const VerifyArgs& a, int64_t row, const RowSpan<T>& span,
                                   const RowParams& p, SharedState& sh) {
  const CandidateSummary* sums = a.summaries + row * a.splits;
  const RowCandidateKeys keys{a.candidates + row * a.splits * a.capacity, sums, a.splits,
                              a.capacity};
  u64 admit = 0, max_key = 0, overflow = 0, count = 0;
  for (int s = threadIdx.x; s < a.splits; s += blockDim.x) {
    admit = umax64(admit, __ldcg(&sums[s].admit_key));
    max_key = umax64(max_key, ordered_key(__ldcg(&sums[s].max_z)));
    overflow = umax64(overflow, __ldcg(&sums[s].overflow));
    count += __ldcg(&sums[s].count);
  }
  admit = block_max(admit, sh);
  overflow = block_max(overflow, sh);
  count = block_sum(count, sh);
  const float z_max = key_to_float(static_cast<uint32_t>(block_max(max_key, sh)));
  bool exact = !overflow && z_max < INFINITY && z_max > -INFINITY;

  uint32_t min_key = 0;
  if (exact && p.top_k_on) {
    const u64 k = static_cast<u64>(p.top_k);
    exact = count >= k;
    if (exact) {
      min_key = radix_select(keys, UnitWeight{}, [k](u64) { return k; }, sh);
      exact = min_key >= admit;
    }
  }
  if (exact && p.top_p_on) {
    // Top-k kept only candidates: their mass is the whole. Otherwise the dropped tokens'
    // exact mass sum(floor(exp(z - z_max) * 2^32)) lies in [lo, hi].
    u64 lo = 0, hi = 0;
    if (!p.top_k_on) {
      double estimate = 0.0;
      u64 terms = 0;
      for (int s = threadIdx.x; s < a.splits; s += blockDim.x) {
        const double mass = __ldcg(&sums[s].dropped_mass);
        if (mass > 0.0) {
          estimate += mass * exp(static_cast<double>(__ldcg(&sums[s].max_z)) - z_max);
        }
        terms += __ldcg(&sums[s].dropped_terms);
      }
      estimate = block_sum(estimate, sh) * 4294967296.0;
      terms = block_sum(terms, sh);
      lo = static_cast<u64>(fmax(0.0, ceil(estimate * (1.0 - kDroppedMassError) - terms)));
      hi = static_cast<u64>(floor(estimate * (1.0 + 2.0 * kDroppedMassError))) + 1;
    }
    const TopPWeight weight{min_key, z_max};
    const float top_p = p.top_p;
    // The threshold falls as the limit rises: the two ends agreeing fixes it.
    min_key = radix_select(
        keys, weight, [=](u64 total) { return top_p_limit(top_p, total + hi); }, sh);
    exact = sh.select_total >= sh.select_target && min_key >= admit;
    if (exact && lo != hi) {
      exact = min_key == radix_select(
                             keys, weight,
                             [=](u64 total) { return top_p_limit(top_p, total + lo); }, sh);
    }
  }
  if (!exact) {
    return block_max(thread_best<T, false>(span, span.whole(), p, filter_min_key(span, p, sh)),
                     sh);
  }
  u64 best = 0;
  keys([&](uint32_t key, float z, int64_t v) {
    if (key < min_key) return;
    const Philox4 noise = noise_block(p.seed, p.pos, static_cast<uint32_t>(v >> 2));
    best = umax64(best, pack(z + gumbel_from_word(noise.word(static_cast<uint32_t>(v & 3))), v));
  });
  return block_max(best, sh);
}

// The finishing CTA of request `req`: its rows' tokens, then accept length, stop / budget
// cuts and the outputs.
__device__ void finish_request(const VerifyArgs& a, int64_t req, SharedState& sh) {
  __threadfence();  // order the row reads after the arrival that made this CTA last
  for (int k = threadIdx.x; k < a.block; k += blockDim.x) {
    sh.target[k] = unpack_index(__ldcg(a.row_best + req * a.block + k));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t* t = sh.target;
    const int64_t* draft = a.draft_tokens + req * (a.block - 1);
    int64_t accept = 0;
    while (accept < a.block - 1 && draft[accept] == t[accept]) ++accept;
    // Committed t_0 .. t_a, cut after the first stop token, then to the remaining budget.
    int64_t n = accept + 1;
    const int64_t* stops = a.stop_token_ids + req * a.num_stops;
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t s = 0; s < a.num_stops; ++s) {
        if (stops[s] == t[j]) n = j + 1;
      }
    }
    const int64_t budget = a.remaining[req] > 0 ? a.remaining[req] : 0;
    if (budget < n) n = budget;
    a.accept_lens[req] = accept;
    a.num_committed[req] = n;
    a.new_seq_lens[req] = a.seq_lens[req] + n;
    sh.num_committed = n;
  }
  __syncthreads();
  for (int k = threadIdx.x; k < a.block; k += blockDim.x) {
    const bool kept = k < sh.num_committed;
    a.committed[req * a.block + k] = kept ? sh.target[k] : -1;
    a.free_slots[req * a.block + k] = kept ? -1 : a.block_slots[req * a.block + k];
  }
}

// Thread 0 publishes this CTA's writes and counts it in; true (in every thread) for the last
// of `expected` arrivals.
__device__ bool arrive_last(unsigned int* counter, unsigned expected, SharedState& sh) {
  __threadfence();  // every thread's writes, before the arrival that may make another CTA last
  __syncthreads();
  if (threadIdx.x == 0) sh.last = atomicAdd(counter, 1u) == expected - 1;
  __syncthreads();
  return sh.last;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    verify_block_kernel(const VerifyArgs a) {
  __shared__ SharedState sh;
  const int64_t row = blockIdx.x / a.splits;
  const int split = blockIdx.x % a.splits;
  const int64_t req = row / a.block;

  RowParams p;
  p.temperature = a.temperatures[req];
  p.top_p = a.top_p[req];
  p.top_k = a.top_k[req];
  p.seed = static_cast<uint64_t>(a.seeds[req]);
  p.pos = static_cast<uint64_t>(a.seq_lens[req] + row % a.block);
  p.greedy = !(p.temperature > 0.f);
  p.top_k_on = p.top_k > 0 && p.top_k < a.vocab;
  p.top_p_on = p.top_p < 1.f;
  const bool filtered = !p.greedy && (p.top_k_on || p.top_p_on);

  // One pass over this CTA's chunk of the row.
  const RowSpan<T> span(static_cast<const T*>(a.logits) + row * a.row_stride, a.vocab);
  const Chunk chunk = span.chunk(split, a.splits);
  if (filtered) {
    collect_candidates(span, chunk, p.temperature, a.capacity,
                       a.candidates + int64_t(blockIdx.x) * a.capacity, a.summaries + blockIdx.x,
                       sh);
  } else {
    const u64 best = p.greedy ? thread_best<T, true>(span, chunk, p, 0)
                              : thread_best<T, false>(span, chunk, p, 0);
    const u64 cta_best = block_max(best, sh);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = cta_best;
  }
  if (!arrive_last(a.row_arrivals + row, static_cast<unsigned>(a.splits), sh)) return;

  // The row's last CTA: its token, from every CTA's results.
  __threadfence();  // order the reads after the arrival that made this CTA last
  u64 row_best = 0;
  if (filtered) {
    row_best = select_filtered_row(a, row, span, p, sh);
  } else {
    for (int s = threadIdx.x; s < a.splits; s += blockDim.x) {
      row_best = umax64(row_best, __ldcg(a.partials + row * a.splits + s));
    }
    row_best = block_max(row_best, sh);
  }
  if (threadIdx.x == 0) a.row_best[row] = row_best;
  if (arrive_last(a.arrivals + req, static_cast<unsigned>(a.block), sh)) finish_request(a, req, sh);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_block_cuda(
    const at::Tensor& draft_tokens, const at::Tensor& logits, const at::Tensor& seq_lens,
    const at::Tensor& remaining, const at::Tensor& temperatures, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seeds, const at::Tensor& stop_token_ids,
    const at::Tensor& block_slots) {
  check_verify_block_args(draft_tokens, logits, seq_lens, remaining, temperatures, top_k, top_p,
                          seeds, stop_token_ids, block_slots);
  const int64_t bs = block_slots.size(0), B = block_slots.size(1), vocab = logits.size(1);
  TORCH_CHECK(B <= kMaxBlock, "verify_block: block size at most ", kMaxBlock, ", got ", B);
  TORCH_CHECK(vocab < (int64_t(1) << 31), "verify_block: vocab must be below 2^31");
  const c10::cuda::CUDAGuard guard(logits.device());

  auto opts = block_slots.options();
  auto accept_lens = at::empty({bs}, opts), num_committed = at::empty({bs}, opts);
  auto new_seq_lens = at::empty({bs}, opts);
  auto committed = at::empty({bs, B}, opts), free_slots = at::empty({bs, B}, opts);
  if (bs == 0) return {accept_lens, committed, num_committed, new_seq_lens, free_slots};

  const int64_t rows = bs * B;
  const auto draft = draft_tokens.contiguous(), lens = seq_lens.contiguous();
  const auto budget = remaining.contiguous(), temps = temperatures.contiguous();
  const auto ks = top_k.contiguous(), ps = top_p.contiguous(), keys = seeds.contiguous();
  const auto stops = stop_token_ids.contiguous(), slots = block_slots.contiguous();
  VerifyArgs a;
  a.draft_tokens = draft.data_ptr<int64_t>();
  a.logits = logits.data_ptr();
  a.seq_lens = lens.data_ptr<int64_t>();
  a.remaining = budget.data_ptr<int64_t>();
  a.top_k = ks.data_ptr<int64_t>();
  a.seeds = keys.data_ptr<int64_t>();
  a.stop_token_ids = stops.data_ptr<int64_t>();
  a.block_slots = slots.data_ptr<int64_t>();
  a.temperatures = temps.data_ptr<float>();
  a.top_p = ps.data_ptr<float>();
  a.accept_lens = accept_lens.data_ptr<int64_t>();
  a.committed = committed.data_ptr<int64_t>();
  a.num_committed = num_committed.data_ptr<int64_t>();
  a.new_seq_lens = new_seq_lens.data_ptr<int64_t>();
  a.free_slots = free_slots.data_ptr<int64_t>();
  a.row_stride = logits.stride(0);
  a.vocab = vocab;
  a.num_stops = stop_token_ids.size(1);
  a.block = static_cast<int>(B);

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(
      logits.scalar_type(), "verify_block_cuda", AT_WRAP([&] {
        // Split rows until one wave of resident CTAs covers the batch (bs=1 would otherwise
        // read at the pace of B CTAs), keeping >= two 16-byte loads per thread. Large batches
        // need no split: many waves of whole rows keep enough loads in flight.
        int ctas_per_sm = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &ctas_per_sm, verify_block_kernel<scalar_t>, kThreads, 0));
        const int64_t resident =
            int64_t(ctas_per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        const int64_t vecs_per_row = vocab * int64_t(sizeof(scalar_t)) / 16;
        const int64_t max_splits = std::max<int64_t>(1, vecs_per_row / (2 * kThreads));
        const int64_t splits = std::clamp<int64_t>((resident + rows - 1) / rows, 1, max_splits);
        TORCH_CHECK(rows * splits <= INT32_MAX, "verify_block: ", rows,
                    " rows exceed one launch's grid: split the batch");
        // Candidates per CTA of a filtered row: ~kRowCandidates per row, at least enough for
        // the usual top-k (<= kMinCandidates) in every CTA.
        const int64_t capacity =
            std::clamp<int64_t>(kRowCandidates / splits, kMinCandidates, kKeep);
        auto partials = at::empty({rows * splits}, opts);
        auto candidates = at::empty({rows * splits * capacity}, opts);
        static_assert(sizeof(CandidateSummary) % sizeof(int64_t) == 0);
        auto summaries = at::empty(
            {rows * splits * int64_t(sizeof(CandidateSummary) / sizeof(int64_t))}, opts);
        auto row_best = at::empty({rows}, opts);
        auto arrivals = at::zeros({rows + bs}, opts.dtype(at::kInt));
        a.partials = reinterpret_cast<u64*>(partials.data_ptr<int64_t>());
        a.candidates = reinterpret_cast<u64*>(candidates.data_ptr<int64_t>());
        a.summaries = reinterpret_cast<CandidateSummary*>(summaries.data_ptr<int64_t>());
        a.row_best = reinterpret_cast<u64*>(row_best.data_ptr<int64_t>());
        a.row_arrivals = reinterpret_cast<unsigned int*>(arrivals.data_ptr<int32_t>());
        a.arrivals = a.row_arrivals + rows;
        a.splits = static_cast<int>(splits);
        a.capacity = static_cast<int>(capacity);
        DFLARE_LAUNCH(verify_block_kernel<scalar_t>, static_cast<unsigned>(rows * splits),
                      kThreads, stream, a);
      }),
      at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accept_lens, committed, num_committed, new_seq_lens, free_slots};
}

}  // namespace dflare
