// The feature hash of mlfast/hashing.py, bit for bit, plus the bucket reduction.
//
// hashing.py is the definition; tests/test_hashing.py checks this file against it on random
// values for many seeds and field ids.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlfast {

constexpr uint64_t kGolden64 = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kFnvOffset64 = 0xCBF29CE484222325ULL;
constexpr uint64_t kFnvPrime64 = 0x100000001B3ULL;

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xFF51AFD7ED558CCDULL;
  k ^= k >> 33;
  k *= 0xC4CEB9FE1A85EC53ULL;
  k ^= k >> 33;
  return k;
}

inline uint64_t field_salt(uint64_t seed, uint64_t field_id) { return fmix64(seed ^ (field_id * kGolden64)); }

inline uint64_t hash_key(uint64_t value, uint64_t salt) { return fmix64(value ^ salt); }

inline uint64_t fnv1a64(const unsigned char* p, size_t n) {
  uint64_t h = kFnvOffset64;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * kFnvPrime64;
  return h;
}

// key % buckets without a hardware divide (a 64-bit div costs tens of cycles and the parser does
// one per field). Power-of-two bucket counts (the defaults) take a mask. Other counts use the
// direct remainder of Lemire, Kaser & Kurz ("Faster remainder by direct computation", 2019):
// with c = ceil(2^128 / d), a % d = floor(((c * a) mod 2^128) * d / 2^128), exact for every
// 64-bit a and every d >= 2 because c * d - 2^128 < d <= 2^64 (their Theorem 1 with F = 2N).
class Bucketer {
 public:
  Bucketer() = default;
  explicit Bucketer(uint64_t d) : d_(d) {
    pow2_ = d != 0 && (d & (d - 1)) == 0;
    mask_ = d - 1;
    if (!pow2_) c_ = ~static_cast<unsigned __int128>(0) / d + 1;
  }
  uint64_t buckets() const { return d_; }
  uint64_t mod(uint64_t a) const {
    if (pow2_) return a & mask_;
    const unsigned __int128 low = c_ * a;  // mod 2^128
    const uint64_t lo = static_cast<uint64_t>(low), hi = static_cast<uint64_t>(low >> 64);
    // (low * d) >> 128 with low split in 64-bit halves.
    const unsigned __int128 t = static_cast<unsigned __int128>(lo) * d_;
    const unsigned __int128 u = static_cast<unsigned __int128>(hi) * d_ + static_cast<uint64_t>(t >> 64);
    return static_cast<uint64_t>(u >> 64);
  }

 private:
  uint64_t d_ = 1;
  uint64_t mask_ = 0;
  bool pow2_ = true;
  unsigned __int128 c_ = 0;
};

}  // namespace mlfast
