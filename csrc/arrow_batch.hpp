// Rows of an Arrow record batch (from Parquet or Arrow IPC files, read by pyarrow) parsed into the
// reader's Chunk layout: the same ReaderSpec as a delimited log, the same value grammar and the
// same FieldHash, so that a value gets the same id whichever format it was stored in.
//
// The columns arrive as their raw Arrow buffers (validity bitmap, offsets, data; a list column's
// child likewise), checked against their length and offset before any value is read: a malformed
// buffer is a FormatError, never a read outside it. What each column kind accepts:
//
//   label     bool; integers or floats equal to 0 or 1; text "0" / "1" (as the text reader).
//             Null or anything else: bad_label.
//   float     floats (float32 values as their shortest decimal text, which is what a CSV writer
//             prints and the text reader reads back as a double; non-finite: bad_float);
//             integers (as doubles); text (the text grammar, empty = missing). Null = missing.
//   text      text (UTF-8 checked: invalid_utf8; empty = missing); integers as their decimal
//             text; bool as "true" / "false". Null = missing.
//   textseq   text cells split on the bag separator (as the text reader), or a list of text /
//             integers / bools, each element one value, read as the cell of its elements joined
//             by the separator would be: a null list, [], [""] and [null] are the field's missing
//             row; an empty or null element among others is bad_sequence (as "a^^b" is).
//
// Other Arrow types are converted by the caller (mlfast/io/arrow.py) before they come here.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "reader.hpp"

namespace mlfast {

enum class ArrowType : uint8_t {
  kNull,
  kBool,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
  kUInt8,
  kUInt16,
  kUInt32,
  kUInt64,
  kFloat32,
  kFloat64,
  kUtf8,       // string / binary: int32 offsets
  kLargeUtf8,  // large_string / large_binary: int64 offsets
  kList,       // int32 offsets into child
  kLargeList,  // int64 offsets into child
};

struct ByteSpan {
  const uint8_t* p = nullptr;
  size_t n = 0;
};

// One Arrow array: its buffers are borrowed (the caller keeps them alive while it is parsed).
struct ArrowColumn {
  ArrowType type = ArrowType::kNull;
  int64_t length = 0;
  int64_t offset = 0;
  ByteSpan validity;  // p == nullptr: no nulls
  ByteSpan offsets;
  ByteSpan data;
  std::unique_ptr<ArrowColumn> child;  // lists

  // Throws FormatError naming `what` unless every buffer covers offset + length as the type needs,
  // and the offsets (of text and lists) are non-decreasing and stay inside the data / child.
  void validate(const std::string& what) const;
};

class ArrowBatchParser {
 public:
  explicit ArrowBatchParser(ReaderSpec spec);
  // Parses `rows` rows whose first is row `first_row` (1-based) of the file, appending to *out (whose
  // `lines` get each kept row's 0-based row index in the file: first_row - 1 + its index in the batch).
  // columns[c] is spec column c's array (nullptr for ignored columns), each `rows` long.
  // A bad row throws ParseFailure (line = its row, found_fields = 0 when the value was null, 1
  // otherwise), or is dropped and counted when the spec skips bad rows.
  void parse(const std::vector<const ArrowColumn*>& columns, int64_t rows, int64_t first_row, Chunk* out);
  const ReaderSpec& spec() const { return spec_; }
  Chunk new_chunk() const;

 private:
  struct Result {
    int64_t rows = 0;  // good rows written
    std::array<int64_t, kNumReasons> skipped{};
    bool failed = false;
    int64_t fail_row = 0;  // index in the batch
    int fail_column = -1;
    Reason fail_reason = kOk;
    bool fail_null = false;
  };
  struct Out {
    float* labels;
    float* dense;
    uint8_t* missing;
    int64_t* sparse;
    int64_t* bag_lengths;
    int64_t* lines;  // each kept row's 0-based row index in the file
  };
  // Rows [begin, end) of the batch, whose row 0 is row `row_base` (0-based) of the file.
  Result parse_range(const std::vector<const ArrowColumn*>& columns, int64_t begin, int64_t end, int64_t row_base,
                     Out out, BagValues* bags) const;
  // Parses row i's column c into the row's outputs; kOk or why not (*null: the value was null).
  Reason parse_value(int c, const ArrowColumn& col, int64_t i, float* label, float* dense, uint8_t* missing,
                     int64_t* sparse, BagValues* bags, int64_t* bag_lengths, bool* null) const;
  Reason parse_list_bag(const ArrowColumn& col, int64_t i, const FieldHash& fd, BagValues* bag,
                        int64_t* length) const;
  std::string value_text(const ArrowColumn& col, int64_t i) const;

  ReaderSpec spec_;
  std::vector<FieldHash> fields_;
  int num_sparse_;
  int num_bags_;
  int num_dense_;
  bool keys_;
  std::vector<std::vector<BagValues>> range_bags_;
};

}  // namespace mlfast
