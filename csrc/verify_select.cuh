// Device helpers of verify_block_cuda.cu: ordered float keys, block reductions, logits row
// spans, radix selection, and the one-pass candidate collection of filtered (top-k / top-p)
// rows. The rules they implement are defined in dflare_sgl/verify.py.
#pragma once

#include <cstdint>
#include <type_traits>

#include "philox.h"

namespace dflare {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Registers capped for 3 resident CTAs per SM (80 per thread on sm_90, as before the candidate
// pass; uncapped it takes ~116, 2 CTAs): ptxas then spills ~100 bytes, timed on no GPU yet.
constexpr int kMinCtasPerSm = 3;
constexpr int kUnroll = 4;       // 16-byte loads in flight per thread
constexpr int kMaxBlock = 1024;  // the finishing CTA keeps t_0 .. t_{B-1} in shared memory

// Candidates of a filtered row (see collect_candidates): a CTA's shared buffer holds what it
// keeps (at most kKeep after each compaction) plus one round of admissions (kRoundElems per
// thread), so appends never overflow it.
constexpr int kRoundElems = 4;
constexpr int kKeep = 512;
constexpr int kCandidateBuffer = 2048;
constexpr int kCompactAbove = kCandidateBuffer - kThreads * kRoundElems;
static_assert(kCompactAbove >= kKeep + 16, "a compaction must leave room for a round");

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

// (key, inverted index): the integer max is the largest key, lowest index on ties.
// 0 is below every packed score and serves as "no candidate".
__device__ __forceinline__ u64 pack_key(uint32_t key, int64_t index) {
  return (static_cast<u64>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

__device__ __forceinline__ u64 pack(float score, int64_t index) {
  return pack_key(ordered_key(score), index);
}

__device__ __forceinline__ uint32_t unpack_key(u64 packed) {
  return static_cast<uint32_t>(packed >> 32);
}

__device__ __forceinline__ int64_t unpack_index(u64 packed) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(packed);
}

struct SharedState {
  u64 hist[256];  // radix-select histogram
  u64 warp_u64[kWarps];
  double warp_f64[kWarps];
  u64 select_base, select_target, select_total;
  uint32_t select_prefix;
  uint32_t appends[3];  // per round, cycled (see collect_candidates)
  uint32_t compacted, admit_key;
  bool overflow, last;
  int64_t num_committed;
  union {
    u64 candidates[kCandidateBuffer];  // a filtered row's CTA: its candidates
    int64_t target[kMaxBlock];         // the finishing CTA: the request's target tokens
  };
};

// Block-wide reduction; every thread gets the result. The butterfly gives every lane the
// same operand order, so floating-point sums are identical across threads and runs.
template <typename T, typename Op>
__device__ T block_reduce(T x, Op op, T identity, T* warp_scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = op(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  }
  __syncthreads();  // the scratch may still be read by a previous reduction
  if (threadIdx.x % 32 == 0) warp_scratch[threadIdx.x / 32] = x;
  __syncthreads();
  T y = threadIdx.x % 32 < kWarps ? warp_scratch[threadIdx.x % 32] : identity;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    y = op(y, __shfl_xor_sync(0xFFFFFFFFu, y, offset));
  }
  return y;
}

__device__ u64 block_max(u64 x, SharedState& sh) {
  return block_reduce(x, [](u64 a, u64 b) { return umax64(a, b); }, u64(0), sh.warp_u64);
}
__device__ u64 block_sum(u64 x, SharedState& sh) {
  return block_reduce(x, [](u64 a, u64 b) { return a + b; }, u64(0), sh.warp_u64);
}
__device__ double block_sum(double x, SharedState& sh) {
  return block_reduce(x, [](double a, double b) { return a + b; }, 0.0, sh.warp_f64);
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
  __device__ int64_t tail_begin() const { return head + num_vecs * kVec; }

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
      for (int64_t v = tail_begin() + threadIdx.x; v < vocab; v += blockDim.x) {
        f(v, static_cast<float>(row[v]));
      }
    }
  }
};

// Key visitors for radix_select: keys(f) calls f(key, z, vocab id) for this thread's share.
template <typename T>
struct ScaledRowKeys {  // z = x / T over a whole logits row
  const RowSpan<T>& span;
  float temperature;
  template <typename F>
  __device__ void operator()(F&& f) const {
    span.for_each(span.whole(), [&](int64_t v, float x) {
      const float z = x / temperature;
      f(ordered_key(z), z, v);
    });
  }
};

struct BufferKeys {  // a CTA's candidates in shared memory
  const u64* entries;
  uint32_t count;
  template <typename F>
  __device__ void operator()(F&& f) const {
    for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) {
      const uint32_t key = unpack_key(entries[i]);
      f(key, key_to_float(key), unpack_index(entries[i]));
    }
  }
};

// What a CTA of a filtered row leaves for the row's last CTA besides its candidates.
struct CandidateSummary {
  double dropped_mass;     // sum of exp(z - max_z) over the counted tokens it dropped
  float max_z;             // the largest z of its chunk
  uint32_t count;          // candidates written
  uint32_t admit_key;      // every token of the chunk with key >= admit_key is a candidate
  uint32_t dropped_terms;  // tokens counted in dropped_mass
  uint32_t overflow;       // the buffer could not be cut: the row takes the exact fallback
};

struct RowCandidateKeys {  // every CTA's candidates of one row, written in this launch
  const u64* entries;      // [splits, capacity]
  const CandidateSummary* summaries;
  int splits, capacity;
  template <typename F>
  __device__ void operator()(F&& f) const {
    for (int64_t i = threadIdx.x; i < int64_t(splits) * capacity; i += blockDim.x) {
      if (i % capacity >= __ldcg(&summaries[i / capacity].count)) continue;
      const u64 e = __ldcg(entries + i);
      f(unpack_key(e), key_to_float(unpack_key(e)), unpack_index(e));
    }
  }
};

// Weight of every key when radix selection counts them (top-k).
struct UnitWeight {};

// Weight of a scaled logit when radix selection sums top-p mass: its fixed-point mass below
// the row max z_max, 0 for a token top-k dropped (key below top_k_key).
struct TopPWeight {
  uint32_t top_k_key;
  double z_max;
  __device__ u64 operator()(float z) const {
    return ordered_key(z) < top_k_key ? 0 : top_p_mass(static_cast<double>(z) - z_max);
  }
};

// Radix selection: the largest key x with W(key >= x) >= target, where W sums weight(z)
// over the visited keys (UnitWeight: counts; fixed-point mass for top-p). One histogram pass
// per key byte, from the top; the target may depend on the total weight W(all), known after
// the first pass and left in sh.select_total (with the target in sh.select_target).
template <typename Keys, typename Weight, typename TargetOfTotal>
__device__ uint32_t radix_select(const Keys& keys, Weight weight, TargetOfTotal target_of_total,
                                 SharedState& sh) {
  uint32_t prefix = 0;
  u64 base = 0, target = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t high_mask = shift == 24 ? 0u : ~0u << (shift + 8);
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    keys([&](uint32_t key, float z, int64_t) {
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
        sh.select_total = total;
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

// Top-p mass of the tokens a CTA drops from its candidates. The one pass cannot know the row
// max z_max, so each thread sums exp(z - max_z) relative to the largest z it has seen and
// rescales when that grows; the row's last CTA turns the sums into bounds on the exact
// fixed-point mass (select_filtered_row). A token with z - max_z < -23 has no mass since
// max_z <= z_max (float subtraction rounds monotonically, so the test errs only towards
// counting), and is skipped: no exp for most of a peaked row.
struct DroppedMass {
  float max_z = -INFINITY;
  double sum = 0.0;
  uint32_t terms = 0;

  __device__ __forceinline__ void see(float z) {
    if (z > max_z) {
      if (sum > 0.0) sum *= exp(static_cast<double>(max_z) - static_cast<double>(z));
      max_z = z;
    }
  }
  __device__ __forceinline__ void drop(float z) {  // after see(z)
    const float dz = z - max_z;
    if (dz >= -23.0f) {
      sum += expf(dz);
      ++terms;
    }
  }
};

// Cuts a CTA's `count` > keep candidates to those with key >= cut, the smallest cut leaving
// at most `keep`: one above the (keep+1)-th largest key. The evicted join this thread's
// dropped mass; everything the chunk has with key >= cut stays a candidate (admission only
// rises). Returns the new count (the same in every thread).
__device__ uint32_t compact(uint32_t count, uint32_t keep, DroppedMass& dropped,
                            SharedState& sh) {
  const uint32_t y = radix_select(
      BufferKeys{sh.candidates, count}, UnitWeight{}, [=](u64) { return u64(keep) + 1; }, sh);
  const uint32_t cut = y == 0xFFFFFFFFu ? y : y + 1;
  constexpr int kPerThread = kCandidateBuffer / kThreads;
  u64 mine[kPerThread] = {};
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const uint32_t i = threadIdx.x + r * kThreads;
    if (i >= count) break;
    mine[r] = sh.candidates[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sh.compacted = 0;
    sh.admit_key = cut;
    if (y == 0xFFFFFFFFu) sh.overflow = true;  // keys of NaNs at the top: cannot cut
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    if (threadIdx.x + r * kThreads >= count) break;
    if (unpack_key(mine[r]) >= cut) {
      sh.candidates[atomicAdd(&sh.compacted, 1u)] = mine[r];
    } else {
      const float z = key_to_float(unpack_key(mine[r]));
      dropped.see(z);
      dropped.drop(z);
    }
  }
  __syncthreads();
  return sh.compacted;
}

// One pass over a CTA's chunk of a filtered row: keeps as candidates the tokens with the
// largest z = x / T (at most `capacity`; a token is admitted while its key is at least the
// current cut, which only rises), sums the rest as DroppedMass, and writes both out for the
// row's last CTA. Rounds of kRoundElems tokens per thread, with one barrier each: appends
// count into sh.appends[round % 3]; thread 0 clears the next round's counter before the
// barrier, which every thread passed after reading it two rounds ago.
template <typename T>
__device__ void collect_candidates(const RowSpan<T>& span, const Chunk& c, float temperature,
                                   int capacity, u64* out, CandidateSummary* summary,
                                   SharedState& sh) {
  if (threadIdx.x == 0) {
    sh.appends[0] = 0;
    sh.admit_key = 0;
    sh.overflow = false;
  }
  __syncthreads();
  DroppedMass dropped;
  uint32_t count = 0, admit = 0;
  int round = 0;
  auto offer = [&](int64_t v, float x) {
    const float z = x / temperature;
    dropped.see(z);
    const uint32_t key = ordered_key(z);
    if (key < admit) return dropped.drop(z);
    sh.candidates[count + atomicAdd(&sh.appends[round % 3], 1u)] = pack_key(key, v);
  };
  auto end_round = [&] {
    if (threadIdx.x == 0) sh.appends[(round + 1) % 3] = 0;
    __syncthreads();
    count += sh.appends[round % 3];
    ++round;
    if (count > kCompactAbove) {
      count = compact(count, kKeep, dropped, sh);
      admit = sh.admit_key;
    }
  };

  // The unaligned head and tail elements (fewer than 2 * kVec): one round.
  const int64_t head = c.head ? span.head : 0;
  const int64_t tail = c.tail ? span.vocab - span.tail_begin() : 0;
  if (threadIdx.x < head) {
    offer(threadIdx.x, static_cast<float>(span.row[threadIdx.x]));
  } else if (threadIdx.x < head + tail) {
    const int64_t v = span.tail_begin() + threadIdx.x - head;
    offer(v, static_cast<float>(span.row[v]));
  }
  end_round();

  constexpr int kVec = RowSpan<T>::kVec;
  const uint4* vecs = reinterpret_cast<const uint4*>(span.row + span.head);
  for (int64_t j0 = c.vec_begin; j0 < c.vec_end; j0 += blockDim.x) {  // same trip count for all
    const int64_t j = j0 + threadIdx.x;
    uint4 buf;
    if (j < c.vec_end) buf = __ldg(vecs + j);
    const T* elems = reinterpret_cast<const T*>(&buf);
#pragma unroll
    for (int e0 = 0; e0 < kVec; e0 += kRoundElems) {
      if (j < c.vec_end) {
#pragma unroll
        for (int e = e0; e < e0 + kRoundElems; ++e) {
          offer(span.head + j * kVec + e, static_cast<float>(elems[e]));
        }
      }
      end_round();
    }
  }
  if (count > static_cast<uint32_t>(capacity)) count = compact(count, capacity, dropped, sh);

  for (uint32_t i = threadIdx.x; i < count; i += blockDim.x) out[i] = sh.candidates[i];
  const uint32_t max_key = static_cast<uint32_t>(block_max(ordered_key(dropped.max_z), sh));
  const float max_z = key_to_float(max_key);
  const double mass = block_sum(
      dropped.sum > 0.0
          ? dropped.sum * exp(static_cast<double>(dropped.max_z) - static_cast<double>(max_z))
          : 0.0,
      sh);
  const u64 terms = block_sum(static_cast<u64>(dropped.terms), sh);
  if (threadIdx.x == 0) {
    *summary = CandidateSummary{mass, max_z, count, sh.admit_key, static_cast<uint32_t>(terms),
                                sh.overflow ? 1u : 0u};
  }
}

}  // namespace
}  // namespace dflare
