// Hashing a parsed line's sparse values into row ids, four fields at a time with AVX-512 (VL/DQ:
// 64-bit multiplies in 256-bit registers) where the CPU has it. The scalar loop in reader.cpp is
// the reference; both give the same ids bit for bit (tests run whichever this CPU takes, and the
// scalar one always for bucket counts that are not powers of two).
#pragma once

#include <cstdint>
#include <vector>

namespace mlfast {

// Per sparse field, each array padded with zeros to a multiple of 4 fields.
struct FieldTables {
  std::vector<uint64_t> salt;
  std::vector<uint64_t> mask;     // buckets - 1 (every bucket count a power of two)
  std::vector<int64_t> base;      // offsets[f] + 1
  std::vector<int64_t> missing;   // offsets[f], or 0 for keys
  static int padded(int fields) { return (fields + 3) / 4 * 4; }
};

// Whether this CPU (and OS) can run hash_row_avx512.
bool avx512_hash_available();

// out[f] = missing[f] if absent[f] else (keys ? key | (key == 0) : base[f] + (key & mask[f])),
// key = fmix64(vals[f] ^ salt[f]). vals and absent must be readable for FieldTables::padded(fields)
// entries; exactly `fields` entries of out are written.
void hash_row_avx512(const FieldTables& t, int fields, bool keys, const uint64_t* vals, const uint8_t* absent,
                     int64_t* out);

}  // namespace mlfast
