// A fast, streamable, parallel 64-bit checksum for the binary cache (mlfast/cache.py).
//
// The data is read as little-endian 64-bit words w_j (the last one zero-padded). Each word
// contributes term(w_j, j), a bijection of w_j for fixed j mixed with its index, and the
// checksum is fmix64(sum_j term(w_j, j) ^ fmix64(length)). Because it is a sum, disjoint parts
// are hashed on separate threads (and separate update() calls) and simply added; because each
// term is a bijection of its word, changing any single word always changes the sum, and the
// index makes swapped or shifted words count. It detects corruption; it is not cryptographic.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mlfast {

class Checksum {
 public:
  // Feeds the next n bytes; large inputs are hashed on up to `threads` threads.
  void update(const unsigned char* p, size_t n, int threads);
  uint64_t digest() const;
  uint64_t bytes() const { return bytes_; }

 private:
  uint64_t acc_ = 0;
  uint64_t bytes_ = 0;  // fed so far (the next word's index is (bytes_ - tail_) / 8)
  unsigned char tail_buf_[8] = {};
  size_t tail_ = 0;  // bytes waiting in tail_buf_ for a full word
};

}  // namespace mlfast
