// libFuzzer target of the native reader's C++ entry points, built with
// -fsanitize=fuzzer,address,undefined by .ci/fuzz.sh (clang).
//
// An input is one mode byte, one flags byte and a body:
//   mode 0..2  the body is a file (plain, or gzip when it starts with 1f 8b) read under a Criteo,
//              an Avazu-like or a quoted delimited spec with a bag column;
//   mode 3     the body describes Arrow columns (types, lengths, offsets and raw buffers, mostly
//              malformed) for ArrowBatchParser, each buffer its own exact-size heap block so that
//              any read past one is an ASan report.
// The oracle, besides the sanitizers: a file parses or throws ParseFailure / FormatError and
// nothing else; error mode fails <=> skip mode skips a bad line (both FormatError if either is);
// chunked skip-mode parsing equals read_all (rows, ids, counts) for several block sizes; 1 and 3
// threads agree. A violation calls __builtin_trap().
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "arrow_batch.hpp"
#include "reader.hpp"

using namespace mlfast;

namespace {

void require(bool ok) {
  if (!ok) __builtin_trap();
}

ReaderSpec criteo_spec() {
  ReaderSpec s;
  s.delimiter = '\t';
  s.columns.push_back({Kind::kLabel, "label", -1, -1, false});
  for (int i = 0; i < 13; ++i) s.columns.push_back({Kind::kInt, "I" + std::to_string(i + 1), i, i, true});
  for (int j = 0; j < 26; ++j) s.columns.push_back({Kind::kHex, "C" + std::to_string(j + 1), -1, 13 + j, false});
  s.num_dense = 13;
  s.has_label = true;
  for (int f = 0; f < 39; ++f) s.field_ids.push_back(f + 1);
  return s;
}

ReaderSpec avazu_spec() {
  ReaderSpec s;
  s.delimiter = ',';
  s.columns.push_back({Kind::kIgnore, "id", -1, -1, false});
  s.columns.push_back({Kind::kLabel, "click", -1, -1, false});
  s.columns.push_back({Kind::kHour, "hour", -1, 0, false});
  for (int j = 0; j < 5; ++j) s.columns.push_back({Kind::kText, "C" + std::to_string(j), -1, 3 + j, false});
  s.has_label = true;
  for (int f = 0; f < 8; ++f) s.field_ids.push_back(100 + f);
  return s;
}

ReaderSpec delimited_spec() {
  ReaderSpec s;
  s.delimiter = ',';
  s.quote = '"';
  s.columns.push_back({Kind::kLabel, "clk", -1, -1, false});
  s.columns.push_back({Kind::kFloat, "price", 0, -1, true});
  s.columns.push_back({Kind::kText, "user", -1, 0, false});
  s.columns.push_back({Kind::kText, "item", -1, 1, false});
  s.columns.push_back({Kind::kTextSeq, "hist", -1, 2, false});
  s.num_dense = 1;
  s.has_label = true;
  s.num_bags = 1;
  s.field_ids = {3, 4, 5};
  return s;
}

void finish_spec(ReaderSpec* s, uint8_t flags) {
  const size_t fields = s->field_ids.size();
  const uint64_t buckets = flags & 1 ? 1000 : 1 << 10;  // a Lemire divisor or a mask
  s->buckets.assign(fields, buckets);
  s->offsets.assign(fields + 1, 0);
  s->keys = flags & 2;
  if (!s->keys)
    for (size_t f = 0; f < fields; ++f) s->offsets[f + 1] = s->offsets[f] + static_cast<int64_t>(buckets) + 1;
  s->seed = flags >> 4;
  s->vector_hash = flags & 4;
}

struct Parsed {
  bool corrupt = false, failed = false;
  int64_t rows = 0;
  std::vector<int64_t> sparse, bag;
  std::vector<float> labels, dense;
  std::array<int64_t, kNumReasons> skipped{};
  int64_t fail_line = 0;
};

void append(Parsed* p, const Chunk& c, const ReaderSpec& s) {
  const int F = s.num_sparse();
  p->rows += c.rows;
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t* row = reinterpret_cast<const int64_t*>(const_cast<RowBuffer&>(c.sparse).row(r));
    p->sparse.insert(p->sparse.end(), row, row + F);
    const float* d = reinterpret_cast<const float*>(const_cast<RowBuffer&>(c.dense).row(r));
    p->dense.insert(p->dense.end(), d, d + s.num_dense);
    if (s.has_label) p->labels.push_back(*reinterpret_cast<const float*>(const_cast<RowBuffer&>(c.labels).row(r)));
  }
  for (const BagValues& b : c.bags) {
    BagValues& m = const_cast<BagValues&>(b);
    const int64_t* v = reinterpret_cast<const int64_t*>(m.buffer().row(0));
    p->bag.insert(p->bag.end(), v, v + m.size());
  }
  for (int k = 0; k < kNumReasons; ++k) p->skipped[k] += c.skipped[k];
}

Parsed run(const std::string& path, ReaderSpec s, bool skip, int threads, size_t block, bool chunked) {
  s.skip_bad = skip;
  s.num_threads = threads;
  s.block_bytes = block;
  s.min_range_bytes = 64;
  Parsed p;
  try {
    Reader reader(path, s);
    if (chunked) {
      Chunk c;
      while (reader.next_chunk(&c)) {
        append(&p, c, s);
        c = Chunk();
      }
    } else {
      Chunk c;
      reader.read_all(&c);
      append(&p, c, s);
    }
  } catch (const ParseFailure& f) {
    require(!skip && f.line >= 1 && f.reason > kOk && f.reason < kBlankLine);
    p.failed = true;
    p.fail_line = f.line;
  } catch (const FormatError& e) {
    require(!e.msg.empty());
    p.corrupt = true;
  }
  return p;
}

bool same(const Parsed& a, const Parsed& b) {
  return a.rows == b.rows && a.sparse == b.sparse && a.bag == b.bag && a.labels == b.labels &&
         a.skipped == b.skipped && a.dense.size() == b.dense.size() &&
         (a.dense.empty() || std::memcmp(a.dense.data(), b.dense.data(), a.dense.size() * sizeof(float)) == 0);
}

void fuzz_text(int mode, uint8_t flags, const uint8_t* body, size_t n) {
  const int fd = memfd_create("mlfast-fuzz", 0);
  require(fd >= 0);
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::write(fd, body + done, n - done);
    require(w > 0);
    done += static_cast<size_t>(w);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  ReaderSpec spec = mode == 0 ? criteo_spec() : mode == 1 ? avazu_spec() : delimited_spec();
  finish_spec(&spec, flags);
  const Parsed err = run(path, spec, false, 2, size_t(1) << 20, false);
  const Parsed whole = run(path, spec, true, 1, size_t(1) << 20, false);
  require(err.corrupt == whole.corrupt);
  if (!whole.corrupt) {
    int64_t bad = 0;
    for (int k = kOk + 1; k < kBlankLine; ++k) bad += whole.skipped[k];
    require(err.failed == (bad > 0));
    if (!err.failed) require(same(err, whole));
    require(same(whole, run(path, spec, true, 3, size_t(1) << 20, false)));
    for (size_t block : {size_t(1), size_t(97), size_t(4096)}) {
      require(same(whole, run(path, spec, true, 2, block, true)));
      const Parsed e = run(path, spec, false, 1, block, true);
      require(e.failed == err.failed && e.fail_line == err.fail_line);
    }
  }
  ::close(fd);
}

// ---- Arrow columns from bytes

struct Bytes {
  const uint8_t* p;
  size_t n;
  uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  std::vector<uint8_t> take(size_t k) {
    k = std::min(k, n);
    std::vector<uint8_t> v(p, p + k);
    p += k;
    n -= k;
    return v;
  }
};

constexpr ArrowType kTypes[] = {ArrowType::kNull,    ArrowType::kBool,    ArrowType::kInt8,      ArrowType::kInt32,
                                ArrowType::kInt64,   ArrowType::kUInt64,  ArrowType::kFloat32,   ArrowType::kFloat64,
                                ArrowType::kUtf8,    ArrowType::kLargeUtf8, ArrowType::kList,    ArrowType::kLargeList};

// Each buffer its own heap block of exactly its size: reading past it is an ASan report.
std::unique_ptr<ArrowColumn> column(Bytes* in, int64_t rows, std::vector<std::vector<uint8_t>>* keep, int depth) {
  auto col = std::make_unique<ArrowColumn>();
  col->type = kTypes[in->byte() % (depth ? 10 : 12)];
  const uint8_t shape = in->byte();
  col->length = shape & 0x80 ? rows + (shape & 3) : rows;
  col->offset = shape & 0x40 ? (shape >> 2) & 7 : 0;
  auto buffer = [&](ByteSpan* span, size_t size) {
    keep->push_back(in->take(size));
    keep->back().shrink_to_fit();
    *span = ByteSpan{keep->back().empty() ? nullptr : keep->back().data(), keep->back().size()};
  };
  if (shape & 0x20) buffer(&col->validity, in->byte() % 8);
  buffer(&col->offsets, in->byte() % 80);
  buffer(&col->data, in->byte());
  if (col->type == ArrowType::kList || col->type == ArrowType::kLargeList)
    col->child = column(in, in->byte() % 24, keep, depth + 1);
  return col;
}

void fuzz_arrow(uint8_t flags, const uint8_t* body, size_t n) {
  ReaderSpec spec = delimited_spec();
  finish_spec(&spec, flags);
  spec.skip_bad = flags & 8;
  spec.num_threads = 1 + (flags >> 6);
  spec.min_range_bytes = 2;
  ArrowBatchParser parser(spec);
  Bytes in{body, n};
  const int64_t rows = in.byte() % 24;
  std::vector<std::vector<uint8_t>> keep;
  std::vector<std::unique_ptr<ArrowColumn>> cols;
  std::vector<const ArrowColumn*> ptrs;
  for (size_t c = 0; c < spec.columns.size(); ++c) {
    cols.push_back(column(&in, rows, &keep, 0));
    ptrs.push_back(cols.back().get());
  }
  Chunk chunk = parser.new_chunk();
  try {
    parser.parse(ptrs, rows, 1, &chunk);
    require(chunk.rows <= rows);
  } catch (const FormatError&) {
  } catch (const ParseFailure& f) {
    require(!spec.skip_bad && f.line >= 1 && f.line <= rows);
  } catch (const std::invalid_argument&) {  // a sequence column of a type it cannot be
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int mode = data[0] % 4;
  if (mode == 3)
    fuzz_arrow(data[1], data + 2, size - 2);
  else
    fuzz_text(mode, data[1], data + 2, size - 2);
  return 0;
}
