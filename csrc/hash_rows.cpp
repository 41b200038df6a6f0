#include "hash_rows.hpp"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MLFAST_AVX512_HASH 1
#endif

namespace mlfast {

#if MLFAST_AVX512_HASH

bool avx512_hash_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
}

// 256-bit registers: as fast as 512-bit ones on the CPUs that split them, and no frequency
// penalty on those that do not.
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"))) void hash_row_avx512(
    const FieldTables& t, int fields, bool keys, const uint64_t* vals, const uint8_t* absent, int64_t* out) {
  const __m256i m1 = _mm256_set1_epi64x(static_cast<int64_t>(0xFF51AFD7ED558CCDULL));
  const __m256i m2 = _mm256_set1_epi64x(static_cast<int64_t>(0xC4CEB9FE1A85EC53ULL));
  const __m256i one = _mm256_set1_epi64x(1);
  for (int f = 0; f < fields; f += 4) {
    __m256i k = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vals + f)),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.salt.data() + f)));
    k = _mm256_xor_si256(k, _mm256_srli_epi64(k, 33));
    k = _mm256_mullo_epi64(k, m1);
    k = _mm256_xor_si256(k, _mm256_srli_epi64(k, 33));
    k = _mm256_mullo_epi64(k, m2);
    k = _mm256_xor_si256(k, _mm256_srli_epi64(k, 33));
    __m256i id;
    if (keys) {
      id = _mm256_mask_or_epi64(k, _mm256_cmpeq_epi64_mask(k, _mm256_setzero_si256()), k, one);  // 0 -> 1
    } else {
      id = _mm256_add_epi64(_mm256_and_si256(k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.mask.data() + f))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.base.data() + f)));
    }
    uint32_t a;
    std::memcpy(&a, absent + f, 4);
    const __m128i ab = _mm_cvtsi32_si128(static_cast<int>(a));
    const __mmask8 gone = _mm_test_epi8_mask(ab, ab) & 0x0F;
    id = _mm256_mask_blend_epi64(gone, id, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.missing.data() + f)));
    // The row holds exactly `fields` ids: a masked store writes (and may touch) no lane past it.
    const __mmask8 lanes = fields - f >= 4 ? 0x0F : static_cast<__mmask8>((1u << (fields - f)) - 1);
    _mm256_mask_storeu_epi64(out + f, lanes, id);
  }
}

#else

bool avx512_hash_available() { return false; }
void hash_row_avx512(const FieldTables&, int, bool, const uint64_t*, const uint8_t*, int64_t*) {}

#endif

}  // namespace mlfast
