// Sampling arithmetic shared by the CPU and CUDA verify_block kernels, so that both draw
// bit-identical Gumbel noise and top-p masses. Both are defined by dflare_sgl/verify.py; the
// noise stream is philox_uniform there:
// vocab id v of the row at absolute position `pos` of a request with key `seed` uses word
// (v & 3) of Philox4x32-10(counter = (v >> 2, pos lo32, pos hi32, 0), key = (seed lo32, hi32)).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DFLARE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DFLARE_HOST_DEVICE inline
#endif

namespace dflare {

// Upper bound of every Gumbel value the noise can produce: u <= 1 - 2^-24 gives g <= 16.6356.
// A token whose logit plus this bound is already below a score seen cannot win the argmax,
// so the kernels skip its noise (the transcendental math dominates the sampling cost).
constexpr float kGumbelMax = 16.7f;

struct Philox4 {
  uint32_t w0, w1, w2, w3;

  DFLARE_HOST_DEVICE uint32_t word(uint32_t i) const {
    return i == 0 ? w0 : i == 1 ? w1 : i == 2 ? w2 : w3;  // no local-memory array on device
  }
};

DFLARE_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al., SC'11), as in Random123.
DFLARE_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#ifdef __CUDACC__
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t lo0 = 0xD2511F53u * c.w0, hi0 = mulhi32(0xD2511F53u, c.w0);
    const uint32_t lo1 = 0xCD9E8D57u * c.w2, hi1 = mulhi32(0xCD9E8D57u, c.w2);
    c = Philox4{hi1 ^ c.w1 ^ k0, lo1, hi0 ^ c.w3 ^ k1, lo0};
  }
  return c;
}

// The Philox block that holds the noise words of vocab ids 4*block .. 4*block+3.
DFLARE_HOST_DEVICE Philox4 noise_block(uint64_t seed, uint64_t pos, uint32_t block) {
  return philox4x32_10(
      Philox4{block, static_cast<uint32_t>(pos), static_cast<uint32_t>(pos >> 32), 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Gumbel noise of one Philox word: u = ((x >> 9) + 0.5) * 2^-23 lies in (0, 1) and is exact,
// g = -log(-log(u)) in double (so every implementation agrees after rounding to float).
DFLARE_HOST_DEVICE float gumbel_from_word(uint32_t x) {
  const double u = (static_cast<double>(x >> 9) + 0.5) * 0x1p-23;
  return static_cast<float>(-log(-log(u)));
}

// Top-p probability mass of a token whose scaled logit lies dz below the row max:
// exp(dz) floored to multiples of 2^-32, so that sums are exact and order-independent.
// exp(-23) * 2^32 < 1, so tokens further below have no mass and skip the exp. A tiny
// temperature can scale logits to infinity: dz = inf - inf is NaN only for a token at an
// infinite row max, which has the max's mass (dz = 0); converting NaN would be undefined.
DFLARE_HOST_DEVICE uint64_t top_p_mass(double dz) {
  if (dz != dz) dz = 0.0;
  return dz < -23.0 ? 0 : static_cast<uint64_t>(exp(dz) * 4294967296.0);
}

// A token is kept by top-p iff the kept mass strictly above it is below this limit; the
// ceil makes that an integer comparison, the floor of 1 always keeps the most likely tokens.
DFLARE_HOST_DEVICE uint64_t top_p_limit(float top_p, uint64_t total_mass) {
  return static_cast<uint64_t>(
      fmax(1.0, ceil(static_cast<double>(top_p) * static_cast<double>(total_mass))));
}

}  // namespace dflare
