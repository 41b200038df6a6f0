#include "arrow_batch.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace mlfast {

namespace {

constexpr size_t kMaxText = 200;  // bytes of a bad value kept for the error message

template <class T>
inline T load(const uint8_t* p, int64_t j) {
  T v;
  std::memcpy(&v, p + static_cast<size_t>(j) * sizeof(T), sizeof(T));
  return v;
}

inline bool bit(const uint8_t* p, int64_t j) { return (p[j >> 3] >> (j & 7)) & 1; }

inline bool valid_at(const ArrowColumn& c, int64_t i) {
  if (c.type == ArrowType::kNull) return false;
  return c.validity.p == nullptr || bit(c.validity.p, c.offset + i);
}

// [*a, *b): value i's byte range (text) or element range (lists).
inline void range_at(const ArrowColumn& c, int64_t i, int64_t* a, int64_t* b) {
  const int64_t j = c.offset + i;
  if (c.type == ArrowType::kUtf8 || c.type == ArrowType::kList) {
    *a = load<int32_t>(c.offsets.p, j);
    *b = load<int32_t>(c.offsets.p, j + 1);
  } else {
    *a = load<int64_t>(c.offsets.p, j);
    *b = load<int64_t>(c.offsets.p, j + 1);
  }
}

inline const unsigned char* text_at(const ArrowColumn& c, int64_t i, size_t* n) {
  int64_t a, b;
  range_at(c, i, &a, &b);
  *n = static_cast<size_t>(b - a);
  return c.data.p + a;
}

bool is_text(ArrowType t) { return t == ArrowType::kUtf8 || t == ArrowType::kLargeUtf8; }
bool is_list(ArrowType t) { return t == ArrowType::kList || t == ArrowType::kLargeList; }
bool is_signed(ArrowType t) {
  return t == ArrowType::kInt8 || t == ArrowType::kInt16 || t == ArrowType::kInt32 || t == ArrowType::kInt64;
}
bool is_unsigned(ArrowType t) {
  return t == ArrowType::kUInt8 || t == ArrowType::kUInt16 || t == ArrowType::kUInt32 || t == ArrowType::kUInt64;
}

int64_t signed_at(const ArrowColumn& c, int64_t j) {
  switch (c.type) {
    case ArrowType::kInt8: return load<int8_t>(c.data.p, j);
    case ArrowType::kInt16: return load<int16_t>(c.data.p, j);
    case ArrowType::kInt32: return load<int32_t>(c.data.p, j);
    default: return load<int64_t>(c.data.p, j);
  }
}

uint64_t unsigned_at(const ArrowColumn& c, int64_t j) {
  switch (c.type) {
    case ArrowType::kUInt8: return load<uint8_t>(c.data.p, j);
    case ArrowType::kUInt16: return load<uint16_t>(c.data.p, j);
    case ArrowType::kUInt32: return load<uint32_t>(c.data.p, j);
    default: return load<uint64_t>(c.data.p, j);
  }
}

// An integer's decimal text (what Arrow's cast to string and a CSV writer print), into buf[24].
size_t int_text(const ArrowColumn& c, int64_t j, char* buf) {
  const std::to_chars_result r = is_signed(c.type) ? std::to_chars(buf, buf + 24, signed_at(c, j))
                                                   : std::to_chars(buf, buf + 24, unsigned_at(c, j));
  return static_cast<size_t>(r.ptr - buf);
}

// A float32 as the double its shortest decimal text reads back as: the value a CSV writer's
// "3.9" gives the text reader, where widening would give 3.9000000953674316.
double float32_as_text(float f) {
#if defined(__cpp_lib_to_chars) && __cpp_lib_to_chars >= 201611L
  char buf[64];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof buf, f);
  double d = 0.0;
  detail::decimal_from_chars(buf, r.ptr, d);
  return d;
#else
  return static_cast<double>(f);
#endif
}

std::string float_text(double v) {
  char buf[64];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

size_t fixed_width(ArrowType t) {
  switch (t) {
    case ArrowType::kInt8:
    case ArrowType::kUInt8: return 1;
    case ArrowType::kInt16:
    case ArrowType::kUInt16: return 2;
    case ArrowType::kInt32:
    case ArrowType::kUInt32:
    case ArrowType::kFloat32: return 4;
    case ArrowType::kInt64:
    case ArrowType::kUInt64:
    case ArrowType::kFloat64: return 8;
    default: return 0;
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Validation

void ArrowColumn::validate(const std::string& what) const {
  auto bad = [&](const std::string& why) {
    throw FormatError("malformed Arrow data in " + what + ": " + why);
  };
  if (length < 0 || offset < 0 || offset > std::numeric_limits<int64_t>::max() / 16 - length)
    bad("length " + std::to_string(length) + " / offset " + std::to_string(offset) + " out of range");
  if (length == 0) return;
  const int64_t need = offset + length;  // values a buffer must cover
  if (type == ArrowType::kNull) return;
  if (validity.p != nullptr && validity.n * 8 < static_cast<uint64_t>(need))
    bad("validity bitmap of " + std::to_string(validity.n) + " bytes for " + std::to_string(need) + " values");
  if (type == ArrowType::kBool) {
    if (data.p == nullptr || data.n * 8 < static_cast<uint64_t>(need)) bad("bool data shorter than its values");
    return;
  }
  if (const size_t w = fixed_width(type)) {
    if (data.p == nullptr || data.n / w < static_cast<uint64_t>(need)) bad("data shorter than its values");
    return;
  }
  const size_t ow = type == ArrowType::kUtf8 || type == ArrowType::kList ? 4 : 8;
  if (offsets.p == nullptr || offsets.n / ow < static_cast<uint64_t>(need) + 1)
    bad("offsets shorter than its values + 1");
  uint64_t limit;
  if (is_list(type)) {
    if (!child) bad("a list without its values");
    child->validate(what + " (list values)");
    limit = static_cast<uint64_t>(child->length);
  } else {
    limit = data.n;
  }
  int64_t prev = 0;
  for (int64_t j = offset; j <= need; ++j) {
    const int64_t o = ow == 4 ? load<int32_t>(offsets.p, j) : load<int64_t>(offsets.p, j);
    if (o < 0 || static_cast<uint64_t>(o) > limit || (j > offset && o < prev))
      bad("offset " + std::to_string(o) + " at " + std::to_string(j) + " is decreasing or past the end (" +
          std::to_string(limit) + ")");
    prev = o;
  }
}

// ----------------------------------------------------------------------------------------------
// Parser

ArrowBatchParser::ArrowBatchParser(ReaderSpec spec)
    : spec_(std::move(spec)),
      num_sparse_(spec_.num_sparse()),
      num_bags_(spec_.num_bags),
      num_dense_(spec_.num_dense),
      keys_(spec_.keys) {
  const int nfields = static_cast<int>(spec_.field_ids.size());
  if (spec_.buckets.size() != spec_.field_ids.size() || spec_.offsets.size() != spec_.field_ids.size() + 1)
    throw std::invalid_argument("field_ids, buckets and offsets disagree on the number of fields");
  if (num_bags_ < 0 || num_sparse_ < 0) throw std::invalid_argument("num_bags out of range");
  if (spec_.num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (spec_.id_column != -1)  // mlfast/io/arrow.py takes an id column's text from pyarrow, by the rows' `lines`
    throw std::invalid_argument("the Arrow parser hands out no id column (id_column must be -1)");
  std::vector<int> dense_writers(num_dense_, 0), field_writers(nfields, 0);
  int labels = 0;
  for (const ColumnSpec& c : spec_.columns) {
    switch (c.kind) {
      case Kind::kIgnore:
        break;
      case Kind::kLabel:
        ++labels;
        break;
      case Kind::kFloat:
        if (c.dense < 0 || c.dense >= num_dense_) throw std::invalid_argument("column " + c.name + ": bad dense index");
        ++dense_writers[c.dense];
        break;
      case Kind::kText:
        if (c.sparse < 0 || c.sparse >= num_sparse_)
          throw std::invalid_argument("column " + c.name + ": bad sparse index");
        ++field_writers[c.sparse];
        break;
      case Kind::kTextSeq:
        if (c.sparse < num_sparse_ || c.sparse >= nfields)
          throw std::invalid_argument("column " + c.name + ": a textseq column must write a bag field");
        ++field_writers[c.sparse];
        break;
      default:
        throw std::invalid_argument("column " + c.name +
                                    ": Arrow input takes label, float, text and textseq columns only");
    }
  }
  if (labels != (spec_.has_label ? 1 : 0)) throw std::invalid_argument("label column count disagrees with has_label");
  for (int w : dense_writers)
    if (w != 1) throw std::invalid_argument("each dense column needs exactly one writer");
  for (int w : field_writers)
    if (w != 1) throw std::invalid_argument("each field needs exactly one writer");
  for (int f = 0; f < nfields; ++f) {
    if (spec_.buckets[f] < 1) throw std::invalid_argument("buckets must be >= 1");
    fields_.push_back(FieldHash{field_salt(spec_.seed, spec_.field_ids[f]), Bucketer(spec_.buckets[f]),
                                spec_.offsets[f] + 1, keys_ ? 0 : spec_.offsets[f]});
  }
}

Chunk ArrowBatchParser::new_chunk() const {
  Chunk c;
  c.labels = RowBuffer(spec_.has_label ? sizeof(float) : 0);
  c.dense = RowBuffer(sizeof(float) * num_dense_);
  c.missing = RowBuffer(num_dense_);
  c.sparse = RowBuffer(sizeof(int64_t) * num_sparse_);
  c.bag_lengths = RowBuffer(sizeof(int64_t) * num_bags_);
  c.bags.resize(num_bags_);
  return c;
}

Reason ArrowBatchParser::parse_list_bag(const ArrowColumn& col, int64_t i, const FieldHash& fd, BagValues* bag,
                                        int64_t* length) const {
  int64_t a, b;
  range_at(col, i, &a, &b);
  const ArrowColumn& ch = *col.child;
  // A list reads as the text cell of its elements joined by the separator: [], [""] and [null]
  // are an empty cell, the field's missing row (split_pattern turns an empty cell into [""]).
  bool empty = a == b;
  if (b - a == 1) {
    size_t n = 0;
    empty = !valid_at(ch, a) || (is_text(ch.type) && (text_at(ch, a, &n), n == 0));
  }
  if (empty) {
    bag->push(fd.missing);
    *length = 1;
    return kOk;
  }
  const int64_t start = bag->size();
  for (int64_t k = a; k < b; ++k) {
    Reason r = kOk;
    uint64_t v = 0;
    if (!valid_at(ch, k)) {
      r = kBadSequence;
    } else if (is_text(ch.type)) {
      size_t n;
      const unsigned char* p = text_at(ch, k, &n);
      r = n == 0 ? kBadSequence : text_value(p, n, &v);
    } else if (is_signed(ch.type) || is_unsigned(ch.type)) {
      char buf[24];
      const size_t n = int_text(ch, ch.offset + k, buf);
      v = fnv1a64(reinterpret_cast<const unsigned char*>(buf), n);
    } else if (ch.type == ArrowType::kBool) {
      const bool t = bit(ch.data.p, ch.offset + k);
      v = fnv1a64(reinterpret_cast<const unsigned char*>(t ? "true" : "false"), t ? 4 : 5);
    } else {
      r = kBadSequence;
    }
    if (r != kOk) {
      bag->truncate(start);
      return r;
    }
    bag->push(fd.id(v, keys_));
  }
  *length = bag->size() - start;
  return kOk;
}

Reason ArrowBatchParser::parse_value(int c, const ArrowColumn& col, int64_t i, float* label, float* dense,
                                     uint8_t* missing, int64_t* sparse, BagValues* bags, int64_t* bag_lengths,
                                     bool* null) const {
  const ColumnSpec& cs = spec_.columns[c];
  const bool valid = valid_at(col, i);
  const int64_t j = col.offset + i;
  switch (cs.kind) {
    case Kind::kLabel: {
      if (!valid) return *null = true, kBadLabel;
      double v = -1.0;
      if (col.type == ArrowType::kBool) {
        v = bit(col.data.p, j);
      } else if (is_signed(col.type)) {
        const int64_t x = signed_at(col, j);
        if (x == 0 || x == 1) v = static_cast<double>(x);
      } else if (is_unsigned(col.type)) {
        const uint64_t x = unsigned_at(col, j);
        if (x <= 1) v = static_cast<double>(x);
      } else if (col.type == ArrowType::kFloat32 || col.type == ArrowType::kFloat64) {
        const double x = col.type == ArrowType::kFloat32 ? load<float>(col.data.p, j) : load<double>(col.data.p, j);
        if (x == 0.0 || x == 1.0) v = x;
      } else if (is_text(col.type)) {
        size_t n;
        const unsigned char* p = text_at(col, i, &n);
        float f;
        if (parse_label(p, n, &f) == kOk) v = f;
      }
      if (v != 0.0 && v != 1.0) return kBadLabel;
      *label = static_cast<float>(v);
      return kOk;
    }
    case Kind::kFloat: {
      float* d = dense + cs.dense;
      uint8_t* m = missing + cs.dense;
      double v = 0.0;
      if (!valid) {
        *d = 0.0f;
        *m = 1;
        return kOk;
      }
      if (col.type == ArrowType::kFloat64) {
        v = load<double>(col.data.p, j);
        if (!std::isfinite(v)) return kBadFloat;
      } else if (col.type == ArrowType::kFloat32) {
        const float f = load<float>(col.data.p, j);
        if (!std::isfinite(f)) return kBadFloat;
        v = float32_as_text(f);
      } else if (is_signed(col.type) || is_unsigned(col.type)) {
        const bool neg = is_signed(col.type) && signed_at(col, j) < 0;
        const uint64_t u = neg ? 0 : is_signed(col.type) ? static_cast<uint64_t>(signed_at(col, j)) : unsigned_at(col, j);
        if (cs.log && !neg && u < static_cast<uint64_t>(IntTables::kSize)) {
          *d = int_tables().dense[u];  // signed_log1p_f32(u): log1p of the double, as below
          *m = 0;
          return kOk;
        }
        v = neg ? static_cast<double>(signed_at(col, j)) : static_cast<double>(u);
      } else if (is_text(col.type)) {
        size_t n;
        const unsigned char* p = text_at(col, i, &n);
        if (n == 0) {
          *d = 0.0f;
          *m = 1;
          return kOk;
        }
        if (const Reason r = parse_float(p, n, &v); r != kOk) return r;
      } else {
        return kBadFloat;
      }
      if (cs.log) v = v >= 0 ? std::log1p(v) : -std::log1p(-v);
      *d = static_cast<float>(v);
      *m = 0;
      return kOk;
    }
    case Kind::kText: {
      const FieldHash& fd = fields_[cs.sparse];
      int64_t* out = sparse + cs.sparse;
      uint64_t v;
      if (!valid) {
        *out = fd.missing;
        return kOk;
      }
      if (is_text(col.type)) {
        size_t n;
        const unsigned char* p = text_at(col, i, &n);
        if (n == 0) {
          *out = fd.missing;
          return kOk;
        }
        if (const Reason r = text_value(p, n, &v); r != kOk) return r;
      } else if (is_signed(col.type) || is_unsigned(col.type)) {
        char buf[24];
        const size_t n = int_text(col, j, buf);
        v = fnv1a64(reinterpret_cast<const unsigned char*>(buf), n);
      } else if (col.type == ArrowType::kBool) {
        const bool t = bit(col.data.p, j);
        v = fnv1a64(reinterpret_cast<const unsigned char*>(t ? "true" : "false"), t ? 4 : 5);
      } else {
        return kBadCategorical;
      }
      *out = fd.id(v, keys_);
      return kOk;
    }
    case Kind::kTextSeq: {
      const int s = cs.sparse - num_sparse_;
      const FieldHash& fd = fields_[cs.sparse];
      if (!valid) {
        bags[s].push(fd.missing);
        bag_lengths[s] = 1;
        return kOk;
      }
      if (is_text(col.type)) {
        size_t n;
        const unsigned char* p = text_at(col, i, &n);
        return parse_bag_cell(p, n, spec_.bag_separator, fd, keys_, &bags[s], &bag_lengths[s]);
      }
      if (is_list(col.type)) return parse_list_bag(col, i, fd, &bags[s], &bag_lengths[s]);
      return kBadSequence;
    }
    default:
      return kOk;
  }
}

std::string ArrowBatchParser::value_text(const ArrowColumn& col, int64_t i) const {
  if (!valid_at(col, i)) return "";
  const int64_t j = col.offset + i;
  std::string s;
  if (is_text(col.type)) {
    size_t n;
    const unsigned char* p = text_at(col, i, &n);
    s.assign(reinterpret_cast<const char*>(p), std::min(n, kMaxText));
  } else if (is_signed(col.type) || is_unsigned(col.type)) {
    char buf[24];
    s.assign(buf, int_text(col, j, buf));
  } else if (col.type == ArrowType::kFloat32) {
    s = float_text(load<float>(col.data.p, j));
  } else if (col.type == ArrowType::kFloat64) {
    s = float_text(load<double>(col.data.p, j));
  } else if (col.type == ArrowType::kBool) {
    s = bit(col.data.p, j) ? "true" : "false";
  } else if (is_list(col.type)) {  // the elements as the text reader's cell would hold them
    int64_t a, b;
    range_at(col, i, &a, &b);
    for (int64_t k = a; k < b && s.size() < kMaxText; ++k) {
      if (k > a) s.push_back(spec_.bag_separator);
      s += value_text(*col.child, k);
    }
  }
  if (s.size() > kMaxText) s.resize(kMaxText);
  return s;
}

ArrowBatchParser::Result ArrowBatchParser::parse_range(const std::vector<const ArrowColumn*>& columns,
                                                       int64_t begin, int64_t end, int64_t row_base, Out out,
                                                       BagValues* bags) const {
  Result res;
  const int ncols = static_cast<int>(columns.size());
  const bool skip = spec_.skip_bad;
  std::vector<int64_t> bag_sizes(num_bags_);
  for (int64_t i = begin; i < end; ++i) {
    for (int s = 0; s < num_bags_; ++s) bag_sizes[s] = bags[s].size();
    Reason why = kOk;
    bool null = false;
    int bad = -1;
    for (int c = 0; c < ncols; ++c) {  // file order: a row's reason is its leftmost bad value's
      if (columns[c] == nullptr) continue;
      why = parse_value(c, *columns[c], i, out.labels, out.dense, out.missing, out.sparse, bags, out.bag_lengths,
                        &null);
      if (why != kOk) {
        bad = c;
        break;
      }
    }
    if (bad < 0) {
      ++res.rows;
      *out.lines++ = row_base + i;
      if (out.labels) ++out.labels;
      out.dense += num_dense_;
      out.missing += num_dense_;
      out.sparse += num_sparse_;
      out.bag_lengths += num_bags_;
      continue;
    }
    for (int s = 0; s < num_bags_; ++s) bags[s].truncate(bag_sizes[s]);  // a dropped row leaves no ids
    if (skip) {
      ++res.skipped[why];  // the row's slot is reused by the next row
      continue;
    }
    res.failed = true;
    res.fail_row = i;
    res.fail_column = bad;
    res.fail_reason = why;
    res.fail_null = null;
    return res;
  }
  return res;
}

void ArrowBatchParser::parse(const std::vector<const ArrowColumn*>& columns, int64_t rows, int64_t first_row,
                             Chunk* c) {
  if (columns.size() != spec_.columns.size())
    throw std::invalid_argument("expected one array per spec column (" + std::to_string(spec_.columns.size()) +
                                "), got " + std::to_string(columns.size()));
  if (rows < 0) throw std::invalid_argument("rows must be >= 0");
  for (size_t k = 0; k < columns.size(); ++k) {
    const ColumnSpec& cs = spec_.columns[k];
    if (cs.kind == Kind::kIgnore) continue;
    if (columns[k] == nullptr) throw std::invalid_argument("column " + cs.name + ": no array given");
    if (columns[k]->length != rows)
      throw FormatError("malformed Arrow data in column " + cs.name + ": " + std::to_string(columns[k]->length) +
                        " values in a batch of " + std::to_string(rows) + " rows");
    if (cs.kind == Kind::kTextSeq && is_list(columns[k]->type) == false && !is_text(columns[k]->type) &&
        columns[k]->type != ArrowType::kNull)
      throw std::invalid_argument("column " + cs.name + ": a sequence column must be text or a list");
    columns[k]->validate("column " + cs.name);
  }
  const int64_t row0 = c->rows;
  for (RowBuffer* buf : {&c->labels, &c->dense, &c->missing, &c->sparse, &c->bag_lengths, &c->lines})
    buf->reserve_rows(row0 + rows);
  // Rows per thread at least spec.min_range_bytes (for Arrow input a row count: smaller shares are
  // not worth a thread; tests lower it to split small batches).
  const int64_t min_rows = static_cast<int64_t>(std::max<size_t>(spec_.min_range_bytes, 1));
  const int ranges =
      static_cast<int>(std::clamp<int64_t>(rows / min_rows, 1, static_cast<int64_t>(spec_.num_threads)));
  std::vector<int64_t> cut(ranges + 1);
  for (int r = 0; r <= ranges; ++r) cut[r] = rows * r / ranges;
  if (num_bags_ > 0) {
    range_bags_.resize(ranges - 1);
    for (std::vector<BagValues>& bags : range_bags_) {
      bags.resize(num_bags_);
      for (BagValues& b : bags) b.truncate(0);
    }
  }
  auto out_at = [&](int64_t r) {
    return Out{reinterpret_cast<float*>(c->labels.row(r)), reinterpret_cast<float*>(c->dense.row(r)),
               reinterpret_cast<uint8_t*>(c->missing.row(r)), reinterpret_cast<int64_t*>(c->sparse.row(r)),
               reinterpret_cast<int64_t*>(c->bag_lengths.row(r)), reinterpret_cast<int64_t*>(c->lines.row(r))};
  };
  std::vector<Result> results(ranges);
  parallel_for(ranges, [&](int r) {
    BagValues* bags = r == 0 ? c->bags.data() : num_bags_ > 0 ? range_bags_[r - 1].data() : nullptr;
    Out out = out_at(row0 + cut[r]);
    if (!spec_.has_label) out.labels = nullptr;
    results[r] = parse_range(columns, cut[r], cut[r + 1], first_row - 1, out, bags);
  });
  for (const Result& r : results)  // ranges run in row order: the first failure is the batch's first
    if (r.failed) {
      ParseFailure f;
      f.line = first_row + r.fail_row;
      f.field = spec_.columns[r.fail_column].name;
      f.reason = r.fail_reason;
      f.text = value_text(*columns[r.fail_column], r.fail_row);
      f.found_fields = r.fail_null ? 0 : 1;
      f.expected_fields = -1;
      throw f;
    }
  for (std::vector<BagValues>& bags : range_bags_)
    for (int s = 0; s < num_bags_; ++s) c->bags[s].append(&bags[s]);
  int64_t dst = row0;  // close the gaps skipped rows left at the end of each range's slice
  for (int r = 0; r < ranges; ++r) {
    const int64_t src = row0 + cut[r];
    const int64_t n = results[r].rows;
    if (dst != src && n > 0)
      for (RowBuffer* buf : {&c->labels, &c->dense, &c->missing, &c->sparse, &c->bag_lengths, &c->lines})
        if (buf->row_bytes()) std::memmove(buf->row(dst), buf->row(src), static_cast<size_t>(n) * buf->row_bytes());
    dst += n;
    for (int k = 0; k < kNumReasons; ++k) c->skipped[k] += results[r].skipped[k];
  }
  c->rows = dst;
  if (c->first_line == 0) c->first_line = first_row;
  c->end_line = first_row + rows;
}

}  // namespace mlfast
