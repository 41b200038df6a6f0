#include "checksum.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "hash.hpp"
#include "reader.hpp"  // parallel_for

namespace mlfast {

namespace {

inline uint64_t term(uint64_t w, uint64_t j) {
  uint64_t x = w ^ (j * kGolden64);
  x *= 0xFF51AFD7ED558CCDULL;
  x ^= x >> 32;
  x *= 0xC4CEB9FE1A85EC53ULL;
  x ^= x >> 29;
  return x;
}

inline uint64_t load64(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  w = __builtin_bswap64(w);
#endif
  return w;
}

// Sum of term(word k, first + k) over nwords words. Four independent sums keep the
// multipliers busy.
uint64_t sum_words(const unsigned char* p, size_t nwords, uint64_t first) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  size_t k = 0;
  for (; k + 4 <= nwords; k += 4) {
    a0 += term(load64(p + 8 * k), first + k);
    a1 += term(load64(p + 8 * k + 8), first + k + 1);
    a2 += term(load64(p + 8 * k + 16), first + k + 2);
    a3 += term(load64(p + 8 * k + 24), first + k + 3);
  }
  for (; k < nwords; ++k) a0 += term(load64(p + 8 * k), first + k);
  return a0 + a1 + a2 + a3;
}

}  // namespace

void Checksum::update(const unsigned char* p, size_t n, int threads) {
  if (n == 0) return;
  uint64_t word = (bytes_ - tail_) / 8;
  bytes_ += n;
  if (tail_ > 0) {
    const size_t take = std::min(n, 8 - tail_);
    std::memcpy(tail_buf_ + tail_, p, take);
    tail_ += take;
    p += take;
    n -= take;
    if (tail_ < 8) return;
    acc_ += term(load64(tail_buf_), word++);
    tail_ = 0;
  }
  const size_t nwords = n / 8;
  constexpr size_t kMinWordsPerThread = size_t(1) << 20;  // 8 MiB
  const int t = static_cast<int>(std::clamp<size_t>(nwords / kMinWordsPerThread, 1, static_cast<size_t>(std::max(threads, 1))));
  if (t == 1) {
    acc_ += sum_words(p, nwords, word);
  } else {
    std::vector<uint64_t> part(t, 0);
    parallel_for(t, [&](int i) {
      const size_t lo = nwords * i / t, hi = nwords * (i + 1) / t;
      part[i] = sum_words(p + 8 * lo, hi - lo, word + lo);
    });
    for (uint64_t s : part) acc_ += s;
  }
  tail_ = n - 8 * nwords;
  std::memcpy(tail_buf_, p + 8 * nwords, tail_);
}

uint64_t Checksum::digest() const {
  uint64_t acc = acc_;
  if (tail_ > 0) {
    unsigned char w[8] = {};
    std::memcpy(w, tail_buf_, tail_);
    acc += term(load64(w), (bytes_ - tail_) / 8);
  }
  return fmix64(acc ^ fmix64(bytes_ + kGolden64));
}

}  // namespace mlfast
