// CUDA kernel of torch.ops.dflare.verify_block: the exact rules are documented, and defined
// in plain PyTorch, in dflare_sgl/verify.py; this kernel reproduces them token for token.
//
// Design (one launch, no host sync, CUDA-graph capturable):
//  * The logits read is the whole cost (bs=64, B=16, V=151936 bf16 is ~311 MB), so the grid
//    spreads it evenly: each logits row is split across `splits` CTAs (enough CTAs to fill
//    the GPU even at bs=1), each streams its chunk with 16-byte loads and writes one packed
//    (score, index) partial.
//  * The last CTA to finish a request (an atomic arrival counter per request) reduces that
//    request's partials to the target tokens and does the tiny accept / stop / commit logic.
//    Each launch zeroes its own counters (a memset node under CUDA-graph capture), so
//    launches on different streams or devices never share them.
//  * Rows with top-k / top-p need whole-row thresholds; the first CTA of such a row finds
//    them by radix selection (one counting pass per key byte, served mostly from L2) and then
//    does the Gumbel-max pass itself, while the row's other CTAs only arrive.
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "dflare_ops.h"
#include "philox.h"

namespace dflare {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;             // 16-byte loads in flight per thread
constexpr int kMaxBlock = 1024;        // the finishing CTA keeps t_0 .. t_{B-1} in shared memory

using u64 = unsigned long long;

__device__ __forceinline__ u64 umax64(u64 a, u64 b) { return a > b ? a : b; }

// Monotone map float -> uint32 (for non-NaN values), so byte-wise radix selection and
// integer max order scores as floats do. Adding +0.0f turns -0.0 into +0.0: they are equal.
__device__ __forceinline__ uint32_t ordered_key(float f) {
  const uint32_t bits = __float_as_uint(f + 0.0f);
  return bits ^ ((bits & 0x80000000u) ? 0xFFFFFFFFu : 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float(key ^ ((key & 0x80000000u) ? 0x80000000u : 0xFFFFFFFFu));
}

// (score key, inverted index): the integer max is the best score, lowest index on ties.
// 0 is below every packed score and serves as "no candidate".
__device__ __forceinline__ u64 pack(float score, int64_t index) {
  return (static_cast<u64>(ordered_key(score)) << 32) |
         (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

__device__ __forceinline__ int64_t unpack_index(u64 packed) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(packed);
}

__device__ __forceinline__ u64 warp_max(u64 x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = umax64(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  }
  return x;
}

struct SharedState {
  u64 hist[256];  // radix-select histogram
  u64 warp_best[kWarps];
  u64 select_base, select_target;
  uint32_t select_prefix;
  int64_t target[kMaxBlock];  // finishing CTA: the request's target tokens
  int64_t num_committed;
  bool last;
};

// Block-wide max; every thread gets the result.
__device__ u64 block_max(u64 x, SharedState& sh) {
  x = warp_max(x);
  __syncthreads();  // warp_best may still be read by a previous reduction
  if (threadIdx.x % 32 == 0) sh.warp_best[threadIdx.x / 32] = x;
  __syncthreads();
  return warp_max(threadIdx.x % 32 < kWarps ? sh.warp_best[threadIdx.x % 32] : 0);
}

// A contiguous range of one logits row's 16-byte vectors, plus the unaligned head / tail
// elements when the range includes them.
struct Chunk {
  int64_t vec_begin, vec_end;
  bool head, tail;
};

// One logits row as [head: unaligned elements][16-byte vectors][tail]: vector loads need
// aligned addresses and a row of arbitrary vocab size need not start on one.
template <typename T>
struct RowSpan {
  static constexpr int kVec = 16 / sizeof(T);
  const T* row;
  int64_t vocab, head, num_vecs;

  __device__ RowSpan(const T* row_, int64_t vocab_) : row(row_), vocab(vocab_) {
    const int64_t misaligned = (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T);
    head = misaligned ? min(vocab, kVec - misaligned) : 0;
    num_vecs = (vocab - head) / kVec;
  }

  __device__ Chunk chunk(int split, int splits) const {
    return {num_vecs * split / splits, num_vecs * (split + 1) / splits, split == 0,
            split == splits - 1};
  }
  __device__ Chunk whole() const { return {0, num_vecs, true, true}; }

  // Calls f(vocab id, value as float) for every element of the chunk this thread owns, in
  // increasing vocab id per thread (so strict comparisons keep the lowest index).
  template <typename F>
  __device__ __forceinline__ void for_each(const Chunk& c, F&& f) const {
    if (c.head) {
      for (int64_t v = threadIdx.x; v < head; v += blockDim.x) f(v, static_cast<float>(row[v]));
    }
    const uint4* vecs = reinterpret_cast<const uint4*>(row + head);
    for (int64_t j0 = c.vec_begin + threadIdx.x; j0 < c.vec_end; j0 += kUnroll * blockDim.x) {
      uint4 buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * blockDim.x;
        if (j < c.vec_end) buf[u] = __ldg(vecs + j);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * blockDim.x;
        if (j >= c.vec_end) break;
        const T* elems = reinterpret_cast<const T*>(&buf[u]);
#pragma unroll
        for (int e = 0; e < kVec; ++e) f(head + j * kVec + e, static_cast<float>(elems[e]));
      }
    }
    if (c.tail) {
      for (int64_t v = head + num_vecs * kVec + threadIdx.x; v < vocab; v += blockDim.x) {
        f(v, static_cast<float>(row[v]));
      }
    }
  }
};

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

// Weight of every token when radix selection counts tokens (top-k).
struct UnitWeight {};

// Radix selection over the keys of z = x / T of a whole row: the largest key x with
// W(key >= x) >= target, where W sums weight(z) over the tokens (UnitWeight: counts for
// top-k; fixed-point mass for top-p). One histogram pass per key byte, from the top; the
// target may depend on the total weight, known after the first pass.
template <typename T, typename Weight, typename TargetOfTotal>
__device__ uint32_t radix_select(const RowSpan<T>& span, float temperature, Weight weight,
                                 TargetOfTotal target_of_total, SharedState& sh) {
  uint32_t prefix = 0;
  u64 base = 0, target = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high_mask = shift == 24 ? 0u : ~0u << (shift + 8);
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    span.for_each(span.whole(), [&](int64_t, float x) {
      const float z = x / temperature;
      const uint32_t key = ordered_key(z);
      if ((key & high_mask) != prefix) return;
      const uint32_t bin = (key >> shift) & 255u;
      if constexpr (std::is_same_v<Weight, UnitWeight>) {
        // Logits crowd into few bins: one atomic per distinct bin per warp, not per lane.
        const unsigned peers = __match_any_sync(__activemask(), bin);
        if ((threadIdx.x % 32) == __ffs(peers) - 1) atomicAdd(&sh.hist[bin], u64(__popc(peers)));
      } else {
        const u64 w = weight(z);
        if (w != 0) atomicAdd(&sh.hist[bin], w);
      }
    });
    __syncthreads();
    if (threadIdx.x == 0) {
      if (shift == 24) {
        u64 total = 0;
        for (int b = 0; b < 256; ++b) total += sh.hist[b];
        target = target_of_total(total);
      }
      int b = 255;
      for (; b > 0 && base + sh.hist[b] < target; --b) base += sh.hist[b];
      prefix |= static_cast<uint32_t>(b) << shift;
      sh.select_prefix = prefix;
      sh.select_base = base;
      sh.select_target = target;
    }
    __syncthreads();
    prefix = sh.select_prefix;
    base = sh.select_base;
    target = sh.select_target;
  }
  return prefix;
}

// Smallest kept key of a row under tie-inclusive top-k, then top-p (0: keep everything).
template <typename T>
__device__ uint32_t filter_min_key(const RowSpan<T>& span, const RowParams& p, SharedState& sh) {
  uint32_t min_key = 0;
  if (p.top_k_on) {
    // #{u : z_u > z_v} < k  <=>  z_v >= the k-th largest z, the largest x with count(>= x) >= k.
    const u64 k = static_cast<u64>(p.top_k);
    min_key = radix_select(span, p.temperature, UnitWeight{}, [k](u64) { return k; }, sh);
  }
  if (!p.top_p_on) return min_key;

  // Kept iff (kept mass strictly above) < limit  <=>  z_v >= the largest x with
  // mass(>= x) >= limit, where limit = max(ceil(top_p * total), 1).
  u64 thread_max = 0;
  span.for_each(span.whole(), [&](int64_t, float x) {
    thread_max = umax64(thread_max, ordered_key(x / p.temperature));
  });
  const double z_max = key_to_float(static_cast<uint32_t>(block_max(thread_max, sh)));
  const uint32_t top_k_key = min_key;
  const float top_p = p.top_p;
  return radix_select(
      span, p.temperature,
      [=](float z) -> u64 {
        return ordered_key(z) < top_k_key ? 0 : top_p_mass(static_cast<double>(z) - z_max);
      },
      [=](u64 total) -> u64 { return top_p_limit(top_p, total); }, sh);
}

struct VerifyArgs {
  const int64_t* draft_tokens;
  const void* logits;
  const int64_t *seq_lens, *remaining, *top_k, *seeds, *stop_token_ids, *block_slots;
  const float *temperatures, *top_p;
  int64_t *accept_lens, *committed, *num_committed, *new_seq_lens, *free_slots;
  u64* partials;         // [bs * B * splits]
  unsigned int* arrivals;  // [bs], zero at launch: CTAs of the request that have finished
  int64_t row_stride, vocab, num_stops;
  int block, splits;
};

// The finishing CTA of request `req`: target tokens from the partials, then accept length,
// stop / budget cuts and the outputs.
__device__ void finish_request(const VerifyArgs& a, int64_t req, SharedState& sh) {
  __threadfence();  // order the partial reads after the arrival that made this CTA last
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int k = warp; k < a.block; k += kWarps) {
    const u64* part = a.partials + (req * a.block + k) * a.splits;
    u64 best = 0;
    for (int s = lane; s < a.splits; s += 32) best = umax64(best, __ldcg(part + s));
    best = warp_max(best);
    if (lane == 0) sh.target[k] = unpack_index(best);
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

template <typename T>
__global__ void __launch_bounds__(kThreads) verify_block_kernel(const VerifyArgs a) {
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

  const RowSpan<T> span(static_cast<const T*>(a.logits) + row * a.row_stride, a.vocab);
  u64 best = 0;
  if (p.greedy) {
    best = block_max(thread_best<T, true>(span, span.chunk(split, a.splits), p, 0), sh);
  } else if (!p.top_k_on && !p.top_p_on) {
    best = block_max(thread_best<T, false>(span, span.chunk(split, a.splits), p, 0), sh);
  } else if (split == 0) {
    const uint32_t min_key = filter_min_key(span, p, sh);
    best = block_max(thread_best<T, false>(span, span.whole(), p, min_key), sh);
  }

  if (threadIdx.x == 0) {
    a.partials[blockIdx.x] = best;
    __threadfence();  // publish the partial before arriving
    const unsigned arrivals = static_cast<unsigned>(a.block * a.splits);
    sh.last = atomicAdd(&a.arrivals[req], 1u) == arrivals - 1;
  }
  __syncthreads();
  if (sh.last) finish_request(a, req, sh);
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
        auto partials = at::empty({rows * splits}, opts);
        auto arrivals = at::zeros({bs}, opts.dtype(at::kInt));
        a.partials = reinterpret_cast<u64*>(partials.data_ptr<int64_t>());
        a.arrivals = reinterpret_cast<unsigned int*>(arrivals.data_ptr<int32_t>());
        a.splits = static_cast<int>(splits);
        DFLARE_LAUNCH(verify_block_kernel<scalar_t>, static_cast<unsigned>(rows * splits),
                      kThreads, stream, a);
      }),
      at::kFloat, at::kBFloat16, at::kHalf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {accept_lens, committed, num_committed, new_seq_lens, free_slots};
}

}  // namespace dflare
