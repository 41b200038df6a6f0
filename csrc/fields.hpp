// Parsers for one field's bytes: integers, hex ids, decimal floats, labels, Avazu hours, UTF-8.
//
// Each returns a Reason (kOk or why the bytes are not what the column expects). They never
// allocate and never read outside [p, p + n): the grammar is spelled out with each function
// and tests/reference_reader.py implements the same grammar in plain Python.
#pragma once

#include <array>
#include <cerrno>
#include <charconv>
#include <clocale>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <cstddef>
#include <cstdint>
#include <system_error>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mlfast {

// Stable reason codes; their names (kReasonNames) are the keys of CTRData.skipped.
enum Reason : uint8_t {
  kOk = 0,
  kFieldCount,
  kBadInteger,
  kIntegerOverflow,
  kBadCategorical,
  kBadLabel,
  kBadFloat,
  kBadHour,
  kInvalidUtf8,
  kBadSequence,  // a textseq cell with an empty value ("a^^b", "^a", "a^")
  kBadQuote,     // a quoted field not closed, or closed by a quote followed by more than the delimiter
  kBlankLine,
  kNumReasons
};

inline const char* const kReasonNames[kNumReasons] = {
    "ok",        "field_count", "bad_integer", "integer_overflow", "bad_categorical", "bad_label",
    "bad_float", "bad_hour",    "invalid_utf8", "bad_sequence",    "bad_quote",       "blank_line"};

inline bool is_digit(unsigned char c) { return static_cast<unsigned>(c - '0') < 10u; }

// Label: exactly "0" or "1".
inline Reason parse_label(const unsigned char* p, size_t n, float* out) {
  if (n != 1 || (p[0] != '0' && p[0] != '1')) return kBadLabel;
  *out = static_cast<float>(p[0] - '0');
  return kOk;
}

// Integer: [+-]?[0-9]+ whose value fits int64 (leading zeros allowed). Non-digits are
// reported before overflow, so "99999999999999999999x" is bad_integer, not an overflow.
inline Reason parse_int64(const unsigned char* p, size_t n, int64_t* out) {
  const unsigned char* e = p + n;
  bool neg = false;
  if (p < e && (*p == '-' || *p == '+')) {
    neg = *p == '-';
    ++p;
  }
  if (p == e) return kBadInteger;
  while (p < e && *p == '0') ++p;
  // 19 decimal digits always fit in uint64; a 20th significant digit means overflow.
  uint64_t v = 0;
  size_t significant = 0;
  for (; p < e; ++p) {
    const unsigned d = static_cast<unsigned>(*p - '0');
    if (d > 9) return kBadInteger;
    if (significant < 19) v = v * 10 + d;
    ++significant;
  }
  if (significant > 19) return kIntegerOverflow;
  if (neg) {
    if (v > (static_cast<uint64_t>(1) << 63)) return kIntegerOverflow;
    *out = static_cast<int64_t>(0 - v);  // two's complement, exact for -2^63 too
  } else {
    if (v > static_cast<uint64_t>(INT64_MAX)) return kIntegerOverflow;
    *out = static_cast<int64_t>(v);
  }
  return kOk;
}

namespace detail {
constexpr std::array<uint8_t, 256> make_hex_table() {
  std::array<uint8_t, 256> t{};
  for (int i = 0; i < 256; ++i) t[i] = 0xFF;
  for (int i = 0; i < 10; ++i) t['0' + i] = static_cast<uint8_t>(i);
  for (int i = 0; i < 6; ++i) {
    t['a' + i] = static_cast<uint8_t>(10 + i);
    t['A' + i] = static_cast<uint8_t>(10 + i);
  }
  return t;
}
inline constexpr std::array<uint8_t, 256> kHexTable = make_hex_table();
}  // namespace detail

// Criteo categorical: 1-8 hex digits, either case (the caller handles empty = missing).
inline Reason parse_hex(const unsigned char* p, size_t n, uint64_t* out) {
  if (n > 8) return kBadCategorical;
  uint64_t v = 0;
  unsigned bad = 0;
  // No early exit: at most 8 iterations, and one branch at the end predicts better.
  for (size_t i = 0; i < n; ++i) {
    const uint8_t t = detail::kHexTable[p[i]];
    bad |= t;
    v = (v << 4) | (t & 0x0F);
  }
  if (bad & 0x80) return kBadCategorical;
  *out = v;
  return kOk;
}

// The padded variants below give the same results as parse_hex / parse_int64 but need 16
// readable bytes at p (the reader's blocks are padded), and read an empty field (n == 0) as 0:
// the reader marks it missing. They check and convert up to 8 characters at once, with no loop
// whose trip count follows the field length (a branch that mispredicts whenever the length
// changes, which costs more than the conversion), and no branch on empty.
#if defined(__SSE2__)
namespace detail {
// Bit i set when p[i] is a decimal digit (and, for hex, a-f / A-F), i < 16.
inline unsigned digit_mask(const unsigned char* p, bool hex) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i zero = _mm_setzero_si128();
  // x <= k (unsigned bytes) iff saturating x - k == 0.
  __m128i ok = _mm_cmpeq_epi8(_mm_subs_epu8(_mm_sub_epi8(v, _mm_set1_epi8('0')), _mm_set1_epi8(9)), zero);
  if (hex) {
    const __m128i letter = _mm_sub_epi8(_mm_or_si128(v, _mm_set1_epi8(0x20)), _mm_set1_epi8('a'));
    ok = _mm_or_si128(ok, _mm_cmpeq_epi8(_mm_subs_epu8(letter, _mm_set1_epi8(5)), zero));
  }
  return static_cast<unsigned>(_mm_movemask_epi8(ok));
}

inline uint64_t load_le64(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;  // SSE2 implies x86: little-endian
}

// The first n (0..8) bytes of w moved to the top (n = 0 gives 0: two shifts of at most 32, as
// one shift by 64 is undefined).
inline uint64_t to_top(uint64_t w, size_t n) {
  const unsigned half = static_cast<unsigned>(4 * (8 - n));
  return (w << half) << half;
}

// Value of n (0..8) decimal digits at p (already checked).
inline uint64_t swar_decimal(const unsigned char* p, size_t n) {
  // The first (most significant) digit lands at byte 8 - n and the missing leading digits are
  // zero bytes; then neighbours combine: 2 digits, 4, 8.
  uint64_t x = to_top(load_le64(p) & 0x0F0F0F0F0F0F0F0FULL, n);
  x = (x * 10 + (x >> 8)) & 0x00FF00FF00FF00FFULL;
  x = (x * 100 + (x >> 16)) & 0x0000FFFF0000FFFFULL;
  x = (x * 10000 + (x >> 32)) & 0x00000000FFFFFFFFULL;
  return x;
}
}  // namespace detail

inline Reason parse_hex_padded(const unsigned char* p, size_t n, uint64_t* out) {
  if (n > 8) return kBadCategorical;
  const unsigned need = (1u << n) - 1;
  if ((detail::digit_mask(p, true) & need) != need) return kBadCategorical;
  const uint64_t w = detail::load_le64(p);
  // One nibble per byte: the low 4 bits, +9 for letters (bit 6 set).
  const uint64_t nib = (w & 0x0F0F0F0F0F0F0F0FULL) + 9 * ((w >> 6) & 0x0101010101010101ULL);
  // The n nibbles to the top bytes, then reverse the bytes: digit i ends in byte n - 1 - i.
  uint64_t y = __builtin_bswap64(detail::to_top(nib, n));
  y = (y | (y >> 4)) & 0x00FF00FF00FF00FFULL;
  y = (y | (y >> 8)) & 0x0000FFFF0000FFFFULL;
  y = (y | (y >> 16)) & 0x00000000FFFFFFFFULL;
  *out = y;
  return kOk;
}

inline Reason parse_int64_padded(const unsigned char* p, size_t n, int64_t* out) {
  // Bitwise, not short-circuit: whether a field has a sign is data, and a branch on it mispredicts.
  const unsigned c0 = p[0];
  const unsigned neg = (n != 0) & (c0 == '-');
  const unsigned sign = neg | ((n != 0) & (c0 == '+'));
  const size_t digits = n - sign;
  if (digits > 8 || (sign & (digits == 0))) return parse_int64(p, n, out);
  const unsigned need = (1u << digits) - 1;
  if ((detail::digit_mask(p + sign, false) & need) != need) return kBadInteger;
  const uint64_t v = detail::swar_decimal(p + sign, digits);
  *out = static_cast<int64_t>((v ^ (0 - static_cast<uint64_t>(neg))) + neg);  // -v when negative
  return kOk;
}
#else
inline Reason parse_hex_padded(const unsigned char* p, size_t n, uint64_t* out) {
  if (n == 0) return *out = 0, kOk;
  return parse_hex(p, n, out);
}
inline Reason parse_int64_padded(const unsigned char* p, size_t n, int64_t* out) {
  if (n == 0) return *out = 0, kOk;
  return parse_int64(p, n, out);
}
#endif

// Strict UTF-8 (what Python's bytes.decode("utf-8") accepts): no overlong forms, no
// surrogates, nothing above U+10FFFF.
inline bool valid_utf8(const unsigned char* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    const unsigned c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the first continuation byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // UTF-16 surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return false;
    }
    if (i + len > n) return false;
    if (s[i + 1] < lo || s[i + 1] > hi) return false;
    for (size_t k = 2; k < len; ++k)
      if ((s[i + k] & 0xC0) != 0x80) return false;
    i += len;
  }
  return true;
}

// Text categorical value: fnv1a64 of the bytes, which must be valid UTF-8. The ASCII check
// rides along with the hash so the common case pays for one OR per byte.
inline Reason text_value(const unsigned char* p, size_t n, uint64_t* out) {
  uint64_t h = 0xCBF29CE484222325ULL;
  unsigned high = 0;
  for (size_t i = 0; i < n; ++i) {
    high |= p[i];
    h = (h ^ p[i]) * 0x100000001B3ULL;
  }
  if ((high & 0x80) && !valid_utf8(p, n)) return kInvalidUtf8;
  *out = h;
  return kOk;
}

namespace detail {
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
inline std::from_chars_result decimal_from_chars(const char* first, const char* last, double& value) {
  return std::from_chars(first, last, value);  // correctly rounded, locale-free
}
#else
// Standard libraries without a floating-point from_chars (libstdc++ before GCC 11): strtod in
// the "C" locale on a NUL-terminated copy. Only called on text the grammar below accepted.
inline std::from_chars_result decimal_from_chars(const char* first, const char* last, double& value) {
  static const locale_t c_locale = newlocale(LC_ALL_MASK, "C", nullptr);
  char buf[512];
  std::string big;
  const size_t n = static_cast<size_t>(last - first);
  const char* z = buf;
  if (n < sizeof(buf)) {
    std::memcpy(buf, first, n);
    buf[n] = '\0';
  } else {
    big.assign(first, n);
    z = big.c_str();
  }
  errno = 0;
  char* end = nullptr;
  const double v = strtod_l(z, &end, c_locale);
  std::from_chars_result r{first + (end - z), std::errc()};
  if (errno == ERANGE && (v == HUGE_VAL || v == -HUGE_VAL || v == 0.0)) {
    r.ec = std::errc::result_out_of_range;  // as from_chars: the value is left alone
    return r;
  }
  value = v;
  return r;
}
#endif
}  // namespace detail

// Decimal float: [+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)? and finite. No inf/nan,
// no hex floats, no spaces or underscores (Python's float() takes those; a click log
// should not). Values below the smallest subnormal round to +-0.0 as float() does;
// values beyond DBL_MAX are bad_float (float() would give inf).
inline Reason parse_float(const unsigned char* p, size_t n, double* out) {
  const char* s = reinterpret_cast<const char*>(p);
  const char* e = s + n;
  const char* q = s;
  bool neg = false;
  if (q < e && (*q == '+' || *q == '-')) {
    neg = *q == '-';
    ++q;
  }
  const char* mant = q;
  size_t int_digits = 0, frac_digits = 0;
  while (q < e && is_digit(*q)) ++q, ++int_digits;
  const char* int_end = q;
  if (q < e && *q == '.') {
    ++q;
    while (q < e && is_digit(*q)) ++q, ++frac_digits;
  }
  if (int_digits + frac_digits == 0) return kBadFloat;
  int64_t exp10 = 0;
  if (q < e && (*q == 'e' || *q == 'E')) {
    ++q;
    bool eneg = false;
    if (q < e && (*q == '+' || *q == '-')) {
      eneg = *q == '-';
      ++q;
    }
    size_t exp_digits = 0;
    for (; q < e && is_digit(*q); ++q, ++exp_digits)
      if (exp10 < 100000) exp10 = exp10 * 10 + (*q - '0');  // clamped: only its sign matters below
    if (exp_digits == 0) return kBadFloat;
    if (eneg) exp10 = -exp10;
  }
  if (q != e) return kBadFloat;
  double v = 0.0;
  // from_chars takes a leading '-' but not '+'.
  const auto r = detail::decimal_from_chars(neg ? s : mant, e, v);
  if (r.ec == std::errc::result_out_of_range) {
    // Over- or underflow: decide which from the decimal exponent of the first nonzero digit.
    const char* d = mant;
    while (d < int_end && *d == '0') ++d;
    int64_t mag;
    if (d < int_end) {
      mag = (int_end - d) - 1 + exp10;
    } else {
      const char* f = int_end + (int_end < e && *int_end == '.' ? 1 : 0);
      int64_t zeros = 0;
      while (f < e && *f == '0') ++f, ++zeros;
      mag = -zeros - 1 + exp10;
    }
    if (mag > 0) return kBadFloat;
    v = neg ? -0.0 : 0.0;
  } else if (r.ec != std::errc() || r.ptr != e || !std::isfinite(v)) {
    return kBadFloat;
  }
  *out = v;
  return kOk;
}

// Avazu hour YYMMDDHH (20YY): hour of day, weekday (0 = Monday) and weekend flag.
inline Reason parse_hour(const unsigned char* p, size_t n, int64_t* hour, int64_t* weekday,
                         int64_t* weekend) {
  if (n != 8) return kBadHour;
  for (size_t i = 0; i < 8; ++i)
    if (!is_digit(p[i])) return kBadHour;
  const int yy = (p[0] - '0') * 10 + (p[1] - '0');
  const int mm = (p[2] - '0') * 10 + (p[3] - '0');
  const int dd = (p[4] - '0') * 10 + (p[5] - '0');
  const int hh = (p[6] - '0') * 10 + (p[7] - '0');
  static constexpr int kDaysIn[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  static constexpr int kDaysBefore[12] = {0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334};
  // 2000..2099: every fourth year is a leap year (2000 is one; 2100 is out of range).
  const bool leap = yy % 4 == 0;
  if (mm < 1 || mm > 12 || hh > 23) return kBadHour;
  const int dim = kDaysIn[mm - 1] + (mm == 2 && leap ? 1 : 0);
  if (dd < 1 || dd > dim) return kBadHour;
  const int leaps_before = (yy + 3) / 4;  // leap years in [2000, 2000 + yy)
  const int days = yy * 365 + leaps_before + kDaysBefore[mm - 1] + (mm > 2 && leap ? 1 : 0) + dd - 1;
  const int wd = (5 + days) % 7;  // 2000-01-01 was a Saturday (5 when Monday = 0)
  *hour = hh;
  *weekday = wd;
  *weekend = wd >= 5 ? 1 : 0;
  return kOk;
}

// Criteo integer -> dense value and FuxiCTR bucket. Both are functions of x alone and almost
// every Criteo integer is small, so values in [0, IntTables::kSize) come from tables built with the
// same libm calls; larger and negative values take the direct path.
struct IntTables {
  static constexpr int64_t kSize = 1 << 16;
  float dense[kSize];
  uint8_t bucket[kSize];  // floor(log(65535)^2) = 123 fits; small tables stay in cache
};

// signed_log1p of hashing.py, in float64 then rounded to float32.
inline float signed_log1p_f32(int64_t x) {
  const double d = static_cast<double>(x);
  return static_cast<float>(x >= 0 ? std::log1p(d) : -std::log1p(-d));
}

// fuxictr_int_bucket of hashing.py: floor(log(x) ** 2) for x > 2, else x. Python evaluates
// `** 2` with libm's pow(); calling pow (not l * l, which the compiler would substitute for
// a literal 2.0) keeps the result identical even where pow is not correctly rounded.
inline int64_t fuxictr_bucket(int64_t x) {
  if (x <= 2) return x;
  static volatile double two = 2.0;
  const double l = std::log(static_cast<double>(x));
  return static_cast<int64_t>(std::floor(std::pow(l, two)));
}

inline const IntTables& int_tables() {
  static const IntTables* t = [] {
    auto* tab = new IntTables;
    for (int64_t x = 0; x < IntTables::kSize; ++x) {
      tab->dense[x] = signed_log1p_f32(x);
      tab->bucket[x] = static_cast<uint8_t>(fuxictr_bucket(x));
    }
    return tab;
  }();
  return *t;
}

}  // namespace mlfast
