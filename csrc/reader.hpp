// The schema-driven delimited-log parser behind mlfast.reader.
//
// A line is split on one delimiter byte into columns; each column has a Kind that says what its
// bytes must look like and which outputs (label, dense column, sparse field, bag field) it writes.
// Criteo, Avazu and generic CSV/TSV logs are ReaderSpecs built in mlfast/reader.py.
//
// Input is read in blocks of whole lines, a few MiB per thread (the partial last line carries
// over to the next block), so a file of any size streams through bounded memory and each block
// is still in the cache when it is parsed; a chunk handed to Python gathers blocks up to
// block_bytes. Within a block the lines are cut into one contiguous range per thread; each thread
// parses its range straight into its slice of the output arrays (the row offsets come from a
// parallel newline count).
#pragma once

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fields.hpp"
#include "hash.hpp"
#include "hash_rows.hpp"

namespace mlfast {

enum class Kind : uint8_t {
  kIgnore = 0,   // bytes not looked at
  kLabel = 1,    // "0" / "1" -> labels
  kInt = 2,      // Criteo integer -> dense signed_log1p (+ FuxiCTR bucket as a sparse field)
  kHex = 3,      // 1-8 hex digits -> sparse, value int(hex, 16)
  kText = 4,     // UTF-8 text -> sparse, value fnv1a64(bytes)
  kFloat = 5,    // decimal -> dense (signed_log1p or identity)
  kHour = 6,     // Avazu YYMMDDHH -> three sparse fields: hour, weekday, weekend
  kTextSeq = 7,  // UTF-8 texts joined by the bag separator -> one bag field, each value as kText
};

struct ColumnSpec {
  Kind kind = Kind::kIgnore;
  std::string name;
  int32_t dense = -1;   // output dense column or -1
  int32_t sparse = -1;  // output sparse field (kHour: the first of three; kTextSeq: its bag field) or -1
  bool log = true;      // kFloat: apply signed_log1p
};

struct ReaderSpec {
  char delimiter = '\t';
  bool header = false;  // the first non-blank line is a header: skipped
  std::vector<ColumnSpec> columns;
  int num_dense = 0;
  bool has_label = false;
  // Per field: the F one-hot fields (the columns of the sparse output), then the num_bags bag
  // fields (multi-hot: a variable number of ids per row).
  std::vector<uint64_t> field_ids;  // the hash's field id
  std::vector<uint64_t> buckets;
  std::vector<int64_t> offsets;     // F + num_bags + 1
  int num_bags = 0;
  char bag_separator = '^';  // between the values of a kTextSeq cell
  // The quote byte (0-255), or -1: no quoting (Criteo, Avazu). A field whose first byte is the
  // quote is quoted: its value runs to the matching closing quote ("" inside stands for one
  // quote), which must be followed by the delimiter or the line end (else kBadQuote). Quoted
  // fields never span lines.
  int quote = -1;
  uint64_t seed = 0;
  bool keys = false;      // emit raw 64-bit keys (missing = 0, a real 0 key becomes 1)
  bool skip_bad = false;  // drop bad lines (counted) instead of failing
  int num_threads = 1;
  size_t block_bytes = size_t(64) << 20;        // input per chunk (next_chunk)
  size_t min_range_bytes = size_t(256) << 10;  // smallest per-thread share of a block
  bool vector_hash = true;                      // allow hash_row_avx512 (tests turn it off)
  // The column whose raw value (unquoted) each kept row also hands out as text (CTRData.ids), or
  // -1. Any column, a feature column too: its bytes are copied as they are, never checked.
  int id_column = -1;
  int num_sparse() const { return static_cast<int>(field_ids.size()) - num_bags; }  // F
};

// The first bad line of the input (error mode). Formatted into mlfast.reader.ParseError.
struct ParseFailure : std::exception {
  int64_t line = 0;
  std::string field;  // column name; for a wrong field count the first missing column (or the last)
  Reason reason = kOk;
  std::string text;  // offending bytes (truncated)
  int found_fields = 0;
  int expected_fields = 0;
  const char* what() const noexcept override { return "mlfast parse failure"; }
};

// An OS error on the input (open/read), with errno and path; bindings raise OSError.
struct IoError : std::exception {
  int err;
  std::string path;
  std::string detail;
  IoError(int e, std::string p, std::string d = "") : err(e), path(std::move(p)), detail(std::move(d)) {}
  const char* what() const noexcept override { return "mlfast io error"; }
};

// Corrupt or truncated compressed input, or malformed Arrow buffers; bindings raise
// mlfast._native.CorruptInput (a ValueError), which mlfast.io.reader turns into CorruptInputError.
// Where the damage was found, as far as it is known (-1: unknown).
struct FormatError : std::exception {
  std::string msg;   // the whole message, path first
  std::string path;
  int64_t offset = -1;        // byte offset in the compressed file where decoding stopped
  int64_t decompressed = -1;  // bytes decompressed cleanly before it
  int64_t line = -1;          // the 1-based line of the decompressed text the damage fell in
  explicit FormatError(std::string m, std::string p = "") : msg(std::move(m)), path(std::move(p)) {}
  const char* what() const noexcept override { return msg.c_str(); }
};

// Memory handed to numpy, freed by free_rows (the capsule's deleter).
struct RowMemory {
  void* ptr = nullptr;
  size_t bytes = 0;
  bool mapped = false;  // an anonymous mapping (else malloc)
};
void free_rows(RowMemory m) noexcept;
// Unmaps the released mappings kept for reuse (see RowBuffer); returns the bytes freed.
size_t release_pool() noexcept;

// A growable row-major array. Large ones live in their own anonymous mapping: growing remaps
// the pages instead of copying them, and a released mapping goes to a small process-wide pool
// that the next buffer takes it from. Writing fresh pages costs more than parsing into them
// (first-touch page faults run at ~1.2 GB/s on a small VM, parsing at ~1 GB/s per thread), so
// reusing the pages of the previous chunk, or of arrays the caller dropped, matters.
class RowBuffer {
 public:
  RowBuffer() = default;
  explicit RowBuffer(size_t row_bytes) : row_bytes_(row_bytes) {}
  RowBuffer(RowBuffer&& o) noexcept { *this = std::move(o); }
  RowBuffer& operator=(RowBuffer&& o) noexcept;
  RowBuffer(const RowBuffer&) = delete;
  RowBuffer& operator=(const RowBuffer&) = delete;
  ~RowBuffer() { free_rows(release()); }
  void reserve_rows(int64_t rows);  // grows geometrically
  void shrink_to(int64_t rows);
  // Rows that fit (unbounded for zero-width rows, which need no memory).
  int64_t capacity() const { return row_bytes_ == 0 ? INT64_MAX : cap_; }
  char* row(int64_t r) const { return p_ + static_cast<size_t>(r) * row_bytes_; }
  size_t row_bytes() const { return row_bytes_; }
  RowMemory release() {
    RowMemory m{p_, bytes_, mapped_};
    p_ = nullptr;
    bytes_ = 0;
    cap_ = 0;
    mapped_ = false;
    return m;
  }

 private:
  char* p_ = nullptr;
  size_t bytes_ = 0;
  int64_t cap_ = 0;
  bool mapped_ = false;
  size_t row_bytes_ = 0;
};

// The ids of one bag field, all rows' concatenated in row order: a growable int64 array.
class BagValues {
 public:
  int64_t size() const { return size_; }
  void push(int64_t id) {
    if (size_ == ids_.capacity()) grow(size_ + 1);
    reinterpret_cast<int64_t*>(ids_.row(0))[size_++] = id;
  }
  void truncate(int64_t size) { size_ = size; }
  // Moves other's ids to the end of this one and empties other (keeping its memory).
  void append(BagValues* other);
  void shrink() { ids_.shrink_to(size_); }
  RowBuffer& buffer() { return ids_; }

 private:
  void grow(int64_t size);
  RowBuffer ids_{sizeof(int64_t)};
  int64_t size_ = 0;
};

// One output field's hash constants: a value's id is base + key % buckets (keys mode: the key
// itself, 0 made 1), a missing value's is `missing`. Shared by the text and the Arrow parsers, so
// a value gets the same id whatever file it came from.
struct FieldHash {
  uint64_t salt;
  Bucketer bucketer;
  int64_t base;     // offsets[f] + 1
  int64_t missing;  // offsets[f], or 0 for keys
  int64_t id(uint64_t value, bool keys) const {
    const uint64_t key = hash_key(value, salt);
    return keys ? static_cast<int64_t>(key | (key == 0)) : base + static_cast<int64_t>(bucketer.mod(key));
  }
};

// A sequence cell: values separated by sep, each hashed as a text value of field fd and appended
// to bag; *length = how many. An empty cell is a bag of one id, the field's missing row, so every
// row has at least one id per bag. An empty value ("a^^b", "^a", "a^") is bad_sequence; on any
// error the ids of this cell are taken back.
inline Reason parse_bag_cell(const unsigned char* p, size_t n, char sep, const FieldHash& fd, bool keys,
                             BagValues* bag, int64_t* length) {
  if (n == 0) {
    bag->push(fd.missing);
    *length = 1;
    return kOk;
  }
  const int64_t start = bag->size();
  const unsigned char* const e = p + n;
  for (;;) {
    const void* s = std::memchr(p, sep, static_cast<size_t>(e - p));
    const unsigned char* t = s ? static_cast<const unsigned char*>(s) : e;
    uint64_t v;
    const Reason r = t == p ? kBadSequence : text_value(p, static_cast<size_t>(t - p), &v);
    if (r != kOk) {
      bag->truncate(start);
      return r;
    }
    bag->push(fd.id(v, keys));
    if (t == e) break;
    p = t + 1;
  }
  *length = bag->size() - start;
  return kOk;
}

// Bytes of variable-length values (the id column's), all rows' concatenated in row order.
class ByteValues {
 public:
  int64_t size() const { return size_; }
  void push(const char* p, size_t n) {
    if (n == 0) return;
    const int64_t need = size_ + static_cast<int64_t>(n);
    if (need > bytes_.capacity()) bytes_.reserve_rows(std::max<int64_t>(need, int64_t(1) << 16));  // grows by 1.5x
    std::memcpy(bytes_.row(size_), p, n);
    size_ = need;
  }
  void truncate(int64_t size) { size_ = size; }
  // Moves other's bytes to the end of this one and empties other (keeping its memory).
  void append(ByteValues* other);
  void shrink() { bytes_.shrink_to(size_); }
  RowBuffer& buffer() { return bytes_; }

 private:
  RowBuffer bytes_{1};
  int64_t size_ = 0;
};

// Parsed rows: what one next_chunk() / read_all() returns.
struct Chunk {
  RowBuffer labels, dense, missing, sparse;
  RowBuffer bag_lengths;        // [rows, num_bags] int64: each row's number of ids per bag field
  std::vector<BagValues> bags;  // num_bags
  // [rows] int64: where each row came from. Text: its 1-based line number in the (decompressed)
  // file, header and blank lines counted; Arrow: its 0-based row index in the file. Written by the
  // parsing threads as they keep a row: no pass of its own.
  RowBuffer lines{sizeof(int64_t)};
  RowBuffer id_lengths;  // [rows] int64 with an id column (else 0 wide): each row's id byte count
  ByteValues ids;        // the id column's bytes, all rows' concatenated
  int64_t rows = 0;
  int64_t first_line = 0;  // 1-based line number of the first line this chunk covered
  int64_t end_line = 0;    // one past the last line covered
  uint64_t input_bytes = 0;
  std::array<int64_t, kNumReasons> skipped{};
};

class Source;

// Hands out blocks of whole lines; reads the next block on a helper thread while the current
// one is parsed (when asked to).
class BlockReader {
 public:
  BlockReader(const std::string& path, size_t block_bytes, bool prefetch);
  ~BlockReader();
  // The next block (ends with '\n', readable for 64 bytes past its end); len 0 at the end.
  // Valid until the following call.
  struct Block {
    const char* data = nullptr;
    size_t len = 0;
  };
  Block next();
  // After a line failed to parse in a gzip file: decompress (and discard) up to `limit` more bytes
  // so that damage to the compressed stream, whose garbage may be what failed to parse, is
  // reported as the FormatError it is. Returns normally when the stream is intact that far.
  void verify_rest(uint64_t limit);
  bool gzip() const { return gzip_; }
  uint64_t size() const { return size_; }  // of a plain file (0 for gzip: unknown)

 private:
  Block fill(int buf);
  char* reserve(int buf, size_t bytes);

  std::unique_ptr<Source> src_;
  std::string path_;
  size_t block_bytes_;
  bool prefetch_;
  bool gzip_ = false;
  uint64_t size_ = 0;
  RowBuffer bufs_[2]{RowBuffer(1), RowBuffer(1)};  // pooled like the output: no fresh pages per file
  int cur_ = 0;
  int carry_buf_ = 0;
  size_t carry_off_ = 0, carry_len_ = 0;
  bool eof_ = false;
  std::thread thread_;
  bool pending_ = false;
  Block pending_block_;
  std::exception_ptr pending_error_;
};

class Reader {
 public:
  Reader(const std::string& path, ReaderSpec spec);
  // Parse the next block into a fresh chunk; false at the end of the input.
  bool next_chunk(Chunk* out);
  // Parse all remaining input into one chunk.
  void read_all(Chunk* out);
  const ReaderSpec& spec() const { return spec_; }
  int64_t next_line() const { return next_line_; }

 private:
  using Field = FieldHash;
  struct Out {
    float* labels;
    float* dense;
    uint8_t* missing;
    int64_t* sparse;
    int64_t* bag_lengths;
    int64_t* lines;
    int64_t* id_lengths;
  };
  struct Result {
    int64_t rows = 0;
    int64_t lines = 0;
    const char* stop = nullptr;  // where parsing stopped because the output was full
    std::array<int64_t, kNumReasons> skipped{};
    bool failed = false;
    int64_t fail_line = 0;
    int fail_column = -1;
    Reason fail_reason = kOk;
    int fail_found = 0;
    std::string fail_text;
  };

  Chunk new_chunk() const;
  // Parses one block into c; expect_bytes: the input c should cover in all (sizes its buffers).
  void parse_block(const BlockReader::Block& b, Chunk* c, uint64_t expect_bytes);
  // Fixed-width outputs go to out, bag ids are appended to bags (num_bags of them), id bytes to ids.
  Result parse_range(const char* begin, const char* end, int64_t first_line, Out out, int64_t max_rows,
                     BagValues* bags, ByteValues* ids) const;
  struct QuoteScratch {           // one range's (one thread's), for quoted lines
    std::vector<char> bytes;      // a quoted line's unquoted cells
    std::vector<uintptr_t> ends;  // and where they end (ncols_ + 1)
  };
  // parse_range with (kQuoted) or without quoting: a log that cannot hold quoted fields runs the
  // loop it always ran, with no check for quotes in it (kept out of line, and parse_line always
  // inlined, so that the unquoted loop compiles as before: Criteo parses at the same speed).
  template <bool kQuoted>
  __attribute__((noinline)) Result parse_range_impl(const char* begin, const char* end, int64_t first_line, Out out,
                                                    int64_t max_rows, BagValues* bags, ByteValues* ids,
                                                    QuoteScratch* scratch) const;
  // A line [s, e) holding the quote byte, split and unquoted (see ReaderSpec::quote).
  struct Split {
    int fields = 0;                   // fields found (all of them, if more than the columns)
    int bad_field = -1;               // the field with a bad quote, or -1
    const char* bad_begin = nullptr;  // its raw bytes, for the error message
    const char* bad_end = nullptr;
  };
  // Writes the unquoted cells to out (room for e - s + kPad bytes) as cell 0, delimiter, cell 1,
  // ... and sets ends[0 .. min(fields, ncols_)] as parse_line reads them (ends[0] = out - 1,
  // ends[c + 1] = where cell c ends), so a delimiter byte inside an unquoted value is harmless.
  Split split_quoted(const char* s, const char* e, char* out, uintptr_t* ends) const;
  void reserve(Chunk* c, int64_t rows) const;
  int64_t capacity(const Chunk& c) const;
  Out out_at(const Chunk& c, int64_t row) const;
  // Always inlined into parse_range_impl (its hot loop; called once per line).
  __attribute__((always_inline)) int parse_line(const uintptr_t* ends, float* label, float* dense,
                                                uint8_t* missing, uint64_t* vals, uint8_t* absent,
                                                Reason* why) const;
  struct BagOut {
    BagValues* bags;   // num_bags arrays the ids are appended to
    int64_t* lengths;  // the current row's slot of the bag_lengths output
  };
  int parse_bags(const uintptr_t* ends, int bad_col, Reason* why, BagOut* out) const;
  Reason parse_bag(const unsigned char* p, size_t n, int f, BagValues* bag, int64_t* length) const;
  void hash_row(const uint64_t* vals, const uint8_t* absent, int64_t* sparse) const;
  // A kept line's id column (its cell between ends[id_column] and ends[id_column + 1]) to ids.
  void keep_id(const uintptr_t* ends, int64_t* length, ByteValues* ids) const;
  [[noreturn]] void fail(const Result& r) const;
  // fail(r), unless the input is gzip whose stream turns out damaged: then that FormatError.
  [[noreturn]] void fail_checked(const Result& r);

  // The hot loop's view of a column: 12 bytes instead of a ColumnSpec with its name.
  struct Col {
    Kind kind;
    bool log;
    int32_t dense;
    int32_t sparse;
  };

  struct Run {  // columns [begin, end) of one kind
    Kind kind;
    int begin, end;
  };

  ReaderSpec spec_;
  std::vector<Col> cols_;
  std::vector<Run> runs_;
  std::vector<Field> fields_;
  const IntTables* tables_ = nullptr;
  FieldTables tables4_;       // the fields' hash constants for hash_row_avx512
  bool vector_hash_ = false;  // use it (AVX-512 CPU, power-of-two buckets or keys)
  bool keys_;
  int ncols_;
  int num_sparse_;
  int num_bags_;
  int num_dense_;
  std::vector<int> bag_cols_;                      // the kTextSeq columns
  std::vector<std::vector<BagValues>> range_bags_;  // bag ids of a block's ranges after the first
  std::vector<ByteValues> range_ids_;               // id bytes of a block's ranges after the first
  BlockReader blocks_;
  bool at_start_ = true;
  bool header_pending_;
  bool done_ = false;
  int64_t next_line_ = 1;
  double bytes_per_row_ = 0;  // seen so far: sizes the output of the next block
};

// The first max_bytes bytes of a file's content (decompressed when it is gzip; *gzip says whether),
// through the same source the reader uses: format detection sees what the parser will see, and
// damage is the same FormatError.
std::string read_head(const std::string& path, size_t max_bytes, bool* gzip);

// Runs fn(0) .. fn(n - 1) on n threads, fn(0) on the calling one. An exception thrown by any of
// them is rethrown here, on the calling thread, after all have joined.
void parallel_for(int n, const std::function<void(int)>& fn);

}  // namespace mlfast
