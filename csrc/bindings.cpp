// pybind11 bindings: mlfast._native (re-exported through mlfast.reader and mlfast.cache).
//
// All parsing and checksumming runs with the GIL released. Parsed arrays are handed to numpy
// without a copy: each array owns its malloc'd buffer through a capsule that frees it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <mutex>
#include <string>

#include "arrow_batch.hpp"
#include "checksum.hpp"
#include "reader.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace mlfast {
namespace {

PyObject* g_parse_failure = nullptr;  // mlfast._native.ParseFailure (a ValueError)
PyObject* g_corrupt_input = nullptr;  // mlfast._native.CorruptInput (a ValueError)

Kind kind_from_name(const std::string& s) {
  if (s == "ignore") return Kind::kIgnore;
  if (s == "label") return Kind::kLabel;
  if (s == "int") return Kind::kInt;
  if (s == "hex") return Kind::kHex;
  if (s == "text") return Kind::kText;
  if (s == "float") return Kind::kFloat;
  if (s == "hour") return Kind::kHour;
  if (s == "textseq") return Kind::kTextSeq;
  throw std::invalid_argument("unknown column kind '" + s +
                              "' (expected ignore, label, int, hex, text, float, hour or textseq)");
}

ReaderSpec spec_from_dict(const py::dict& d) {
  ReaderSpec s;
  const auto delim = d["delimiter"].cast<std::string>();
  if (delim.size() != 1) throw std::invalid_argument("delimiter must be one byte, got '" + delim + "'");
  s.delimiter = delim[0];
  s.header = d["header"].cast<bool>();
  for (const py::handle item : d["columns"]) {
    const auto t = item.cast<py::tuple>();
    if (t.size() != 5) throw std::invalid_argument("a column is (kind, name, dense, sparse, log)");
    ColumnSpec c;
    c.kind = kind_from_name(t[0].cast<std::string>());
    c.name = t[1].cast<std::string>();
    c.dense = t[2].cast<int32_t>();
    c.sparse = t[3].cast<int32_t>();
    c.log = t[4].cast<bool>();
    s.columns.push_back(std::move(c));
  }
  s.num_dense = d["num_dense"].cast<int>();
  s.has_label = d["has_label"].cast<bool>();
  s.field_ids = d["field_ids"].cast<std::vector<uint64_t>>();
  s.buckets = d["buckets"].cast<std::vector<uint64_t>>();
  s.offsets = d["offsets"].cast<std::vector<int64_t>>();
  if (d.contains("num_bags")) s.num_bags = d["num_bags"].cast<int>();
  if (d.contains("bag_separator")) {
    const auto sep = d["bag_separator"].cast<std::string>();
    if (sep.size() != 1) throw std::invalid_argument("bag_separator must be one byte, got '" + sep + "'");
    s.bag_separator = sep[0];
  }
  if (d.contains("quote")) {  // one byte, or "" / None: no quoting
    const py::object q = d["quote"];
    const auto quote = q.is_none() ? std::string() : q.cast<std::string>();
    if (quote.size() > 1) throw std::invalid_argument("quote must be one byte or empty (none), got '" + quote + "'");
    s.quote = quote.empty() ? -1 : static_cast<unsigned char>(quote[0]);
  }
  s.seed = d["seed"].cast<uint64_t>();
  s.keys = d["keys"].cast<bool>();
  s.skip_bad = d["skip_bad"].cast<bool>();
  s.num_threads = d["num_threads"].cast<int>();
  s.block_bytes = d["block_bytes"].cast<size_t>();
  if (d.contains("min_range_bytes")) s.min_range_bytes = d["min_range_bytes"].cast<size_t>();
  if (d.contains("vector_hash")) s.vector_hash = d["vector_hash"].cast<bool>();
  if (d.contains("id_column") && !d["id_column"].is_none()) s.id_column = d["id_column"].cast<int>();
  return s;
}

template <class T>
py::array take(RowBuffer& buf, int64_t rows, int64_t width) {
  if (rows == 0 || width == 0) return py::array_t<T>(std::vector<py::ssize_t>{rows, width});
  auto* mem = new RowMemory(buf.release());
  py::capsule owner(mem, [](void* m) {
    free_rows(*static_cast<RowMemory*>(m));
    delete static_cast<RowMemory*>(m);
  });
  return py::array_t<T>(std::vector<py::ssize_t>{rows, width},
                        std::vector<py::ssize_t>{width * static_cast<py::ssize_t>(sizeof(T)), sizeof(T)},
                        static_cast<T*>(mem->ptr), owner);
}

py::dict chunk_to_dict(Chunk& c, const ReaderSpec& s) {
  py::dict d;
  const int64_t n = c.rows;
  if (s.has_label) {
    py::array a = take<float>(c.labels, n, 1);
    d["labels"] = a.attr("reshape")(n);
  } else {
    d["labels"] = py::none();
  }
  d["dense"] = take<float>(c.dense, n, s.num_dense);
  d["dense_missing"] = take<bool>(c.missing, n, s.num_dense);
  d["sparse"] = take<int64_t>(c.sparse, n, s.num_sparse());
  if (s.num_bags > 0) {
    d["bag_lengths"] = take<int64_t>(c.bag_lengths, n, s.num_bags);
    py::list values;
    for (BagValues& b : c.bags) {
      py::array a = take<int64_t>(b.buffer(), b.size(), 1);
      values.append(a.attr("reshape")(b.size()));
    }
    d["bag_values"] = values;
  }
  d["lines"] = take<int64_t>(c.lines, n, 1).attr("reshape")(n);
  if (s.id_column >= 0) {
    d["id_lengths"] = take<int64_t>(c.id_lengths, n, 1).attr("reshape")(n);
    const int64_t nbytes = c.ids.size();
    d["id_data"] = take<uint8_t>(c.ids.buffer(), nbytes, 1).attr("reshape")(nbytes);
  }
  py::dict skipped;
  for (int k = 1; k < kNumReasons; ++k)
    if (c.skipped[k]) skipped[kReasonNames[k]] = c.skipped[k];
  d["skipped"] = skipped;
  d["first_line"] = c.first_line;
  d["end_line"] = c.end_line;
  d["input_bytes"] = c.input_bytes;
  return d;
}

class PyReader {
 public:
  PyReader(const std::string& path, const py::dict& spec) : reader_(path, spec_from_dict(spec)) {}
  py::object next_chunk() {
    Chunk c;
    bool ok;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mu_);
      ok = reader_.next_chunk(&c);
    }
    if (!ok) return py::none();
    return chunk_to_dict(c, reader_.spec());
  }
  py::dict read_all() {
    Chunk c;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mu_);
      reader_.read_all(&c);
    }
    return chunk_to_dict(c, reader_.spec());
  }
  int64_t next_line() const { return reader_.next_line(); }

 private:
  std::mutex mu_;  // one parse at a time per reader
  Reader reader_;
};

struct BufferView {
  Py_buffer view{};
  explicit BufferView(const py::object& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
  }
  ~BufferView() { PyBuffer_Release(&view); }
  const unsigned char* data() const { return static_cast<const unsigned char*>(view.buf); }
  size_t size() const { return static_cast<size_t>(view.len); }
};

class PyChecksum {
 public:
  void update(const py::object& buffer, int threads) {
    BufferView b(buffer);
    py::gil_scoped_release nogil;
    sum_.update(b.data(), b.size(), threads);
  }
  uint64_t digest() const { return sum_.digest(); }
  uint64_t nbytes() const { return sum_.bytes(); }

 private:
  Checksum sum_;
};

ArrowType arrow_type_from_name(const std::string& s) {
  static const std::pair<const char*, ArrowType> kNames[] = {
      {"null", ArrowType::kNull},       {"bool", ArrowType::kBool},         {"int8", ArrowType::kInt8},
      {"int16", ArrowType::kInt16},     {"int32", ArrowType::kInt32},       {"int64", ArrowType::kInt64},
      {"uint8", ArrowType::kUInt8},     {"uint16", ArrowType::kUInt16},     {"uint32", ArrowType::kUInt32},
      {"uint64", ArrowType::kUInt64},   {"float32", ArrowType::kFloat32},   {"float64", ArrowType::kFloat64},
      {"utf8", ArrowType::kUtf8},       {"large_utf8", ArrowType::kLargeUtf8}, {"list", ArrowType::kList},
      {"large_list", ArrowType::kLargeList}};
  for (const auto& [name, t] : kNames)
    if (s == name) return t;
  throw std::invalid_argument("unknown Arrow column type '" + s + "'");
}

// An Arrow array described as (type, length, offset, validity, offsets, data, child): buffers are
// objects with the buffer protocol (pyarrow.Buffer) or None; child is a list's values, or None.
// The views stay open (and the buffers alive) as long as `views` holds them.
std::unique_ptr<ArrowColumn> arrow_column(const py::handle& desc, std::vector<std::unique_ptr<BufferView>>* views) {
  const auto t = desc.cast<py::tuple>();
  if (t.size() != 7)
    throw std::invalid_argument("an Arrow column is (type, length, offset, validity, offsets, data, child)");
  auto col = std::make_unique<ArrowColumn>();
  col->type = arrow_type_from_name(t[0].cast<std::string>());
  col->length = t[1].cast<int64_t>();
  col->offset = t[2].cast<int64_t>();
  ByteSpan* spans[3] = {&col->validity, &col->offsets, &col->data};
  for (int k = 0; k < 3; ++k) {
    const py::object b = t[3 + k];
    if (b.is_none()) continue;
    views->push_back(std::make_unique<BufferView>(b));
    *spans[k] = ByteSpan{views->back()->data(), views->back()->size()};
  }
  if (!t[6].is_none()) col->child = arrow_column(t[6], views);
  return col;
}

class PyArrowParser {
 public:
  explicit PyArrowParser(const py::dict& spec) : parser_(spec_from_dict(spec)) {}
  // accumulate: parse into the parser's own chunk (no dict), which finish() hands out: a whole
  // file's batches end in one set of buffers, grown in place, with no concatenation.
  py::object parse(const py::list& columns, int64_t rows, int64_t first_row, bool accumulate) {
    std::vector<std::unique_ptr<BufferView>> views;
    std::vector<std::unique_ptr<ArrowColumn>> owned;
    std::vector<const ArrowColumn*> cols;
    for (const py::handle item : columns) {
      if (item.is_none()) {
        cols.push_back(nullptr);
        continue;
      }
      owned.push_back(arrow_column(item, &views));
      cols.push_back(owned.back().get());
    }
    Chunk c = parser_.new_chunk();
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mu_);
      if (accumulate) {
        if (!acc_) acc_ = std::make_unique<Chunk>(parser_.new_chunk());
        parser_.parse(cols, rows, first_row, acc_.get());
        acc_->end_line = first_row + rows;
        return py::none();
      }
      parser_.parse(cols, rows, first_row, &c);
      shrink(&c);
    }
    return chunk_to_dict(c, parser_.spec());
  }
  py::dict finish(int64_t first_row) {
    Chunk c = acc_ ? std::move(*acc_) : parser_.new_chunk();
    acc_.reset();
    if (c.first_line == 0) c.first_line = c.end_line = first_row;
    {
      py::gil_scoped_release nogil;
      shrink(&c);
    }
    return chunk_to_dict(c, parser_.spec());
  }

 private:
  static void shrink(Chunk* c) {
    c->labels.shrink_to(c->rows);
    c->dense.shrink_to(c->rows);
    c->missing.shrink_to(c->rows);
    c->sparse.shrink_to(c->rows);
    c->bag_lengths.shrink_to(c->rows);
    c->lines.shrink_to(c->rows);
    for (BagValues& b : c->bags) b.shrink();
  }
  std::mutex mu_;
  ArrowBatchParser parser_;
  std::unique_ptr<Chunk> acc_;
};

py::tuple parse_value(const std::string& kind, const py::bytes& data) {
  std::string s = data;
  const size_t n = s.size();
  // The padded parsers read up to 16 bytes at a time, as in a block. Pad with digits, so a
  // parser that looked past the field would change the value rather than go unnoticed.
  for (int i = 0; i < 64; ++i) s.push_back("9fF0"[i % 4]);
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  Reason r = kOk;
  py::object value = py::none();
  const Kind k = kind_from_name(kind);
  switch (k) {
    case Kind::kLabel: {
      float v;
      if ((r = parse_label(p, n, &v)) == kOk) value = py::float_(v);
      break;
    }
    case Kind::kInt: {  // the reader reads an empty field as missing before parsing it
      int64_t v;
      if (n == 0)
        r = kBadInteger;
      else if ((r = parse_int64_padded(p, n, &v)) == kOk)
        value = py::int_(v);
      break;
    }
    case Kind::kHex: {
      uint64_t v;
      if (n == 0)
        r = kBadCategorical;
      else if ((r = parse_hex_padded(p, n, &v)) == kOk)
        value = py::int_(v);
      break;
    }
    case Kind::kText: {
      uint64_t v;
      if ((r = text_value(p, n, &v)) == kOk) value = py::int_(v);
      break;
    }
    case Kind::kFloat: {
      double v;
      if ((r = parse_float(p, n, &v)) == kOk) value = py::float_(v);
      break;
    }
    case Kind::kHour: {
      int64_t h, wd, we;
      if ((r = parse_hour(p, n, &h, &wd, &we)) == kOk) value = py::make_tuple(h, wd, we);
      break;
    }
    case Kind::kIgnore:
      break;
    case Kind::kTextSeq:
      throw std::invalid_argument("parse_value does not take textseq (a bag of text values): parse each as text");
  }
  return py::make_tuple(r == kOk ? py::object(py::none()) : py::str(kReasonNames[r]), value);
}

}  // namespace
}  // namespace mlfast

PYBIND11_MODULE(_native, m) {
  using namespace mlfast;
  m.doc() = "mlfast native reader: schema-driven delimited-log parser, feature hash, cache checksum";

  g_parse_failure = PyErr_NewException("mlfast._native.ParseFailure", PyExc_ValueError, nullptr);
  m.attr("ParseFailure") = py::handle(g_parse_failure);  // the module keeps a reference
  g_corrupt_input = PyErr_NewException("mlfast._native.CorruptInput", PyExc_ValueError, nullptr);
  m.attr("CorruptInput") = py::handle(g_corrupt_input);

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ParseFailure& f) {
      py::tuple args = py::make_tuple(f.line, f.field, kReasonNames[f.reason], py::bytes(f.text),
                                      f.found_fields, f.expected_fields);
      PyErr_SetObject(g_parse_failure, args.ptr());
    } catch (const IoError& e) {
      // OSError(errno, strerror, filename) picks the subclass (FileNotFoundError, ...) itself.
      py::object exc = py::module_::import("builtins")
                           .attr("OSError")(e.err, std::string(std::strerror(e.err)) + " (" + e.detail + ")", e.path);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
    } catch (const FormatError& e) {
      py::tuple args = py::make_tuple(e.msg, e.path, e.offset < 0 ? py::object(py::none()) : py::int_(e.offset),
                                      e.decompressed < 0 ? py::object(py::none()) : py::int_(e.decompressed),
                                      e.line < 0 ? py::object(py::none()) : py::int_(e.line));
      PyErr_SetObject(g_corrupt_input, args.ptr());
    }
  });

  py::list reasons;
  for (int k = 1; k < kNumReasons; ++k) reasons.append(kReasonNames[k]);
  m.attr("REASONS") = reasons;
  m.attr("INT_TABLE_SIZE") = IntTables::kSize;
  m.attr("AVX512_HASH") = avx512_hash_available();

  py::class_<PyReader>(m, "Reader", "Streaming parser of one file under a reader spec (see mlfast/reader.py).")
      .def(py::init<const std::string&, const py::dict&>(), "path"_a, "spec"_a)
      .def("next_chunk", &PyReader::next_chunk,
           "Parse the next block of lines into a dict of arrays; None at the end of the input.")
      .def("read_all", &PyReader::read_all, "Parse everything left into one dict of arrays.")
      .def_property_readonly("next_line", &PyReader::next_line);

  py::class_<PyArrowParser>(m, "ArrowParser",
                            "Parser of Arrow record batches under a reader spec (see mlfast/io/arrow.py).")
      .def(py::init<const py::dict&>(), "spec"_a)
      .def("parse", &PyArrowParser::parse, "columns"_a, "rows"_a, "first_row"_a, "accumulate"_a = false,
           "Parse one batch (one column description or None per spec column) into a dict of arrays "
           "(accumulate=True: into the parser's own chunk, returning None; finish() hands it out).")
      .def("finish", &PyArrowParser::finish, "first_row"_a = 1,
           "The batches parsed with accumulate=True, as one dict of arrays (empty if none).");

  m.def(
      "read_head",
      [](const std::string& path, size_t max_bytes) {
        bool gzip = false;
        std::string head;
        {
          py::gil_scoped_release nogil;
          head = read_head(path, max_bytes, &gzip);
        }
        return py::make_tuple(py::bytes(head), gzip);
      },
      "path"_a, "max_bytes"_a,
      "(first max_bytes bytes of the content, is_gzip): decompressed through the reader's own source.");

  py::class_<PyChecksum>(m, "Checksum", "Streaming cache checksum (see csrc/checksum.hpp).")
      .def(py::init<>())
      .def("update", &PyChecksum::update, "buffer"_a, "threads"_a = 1)
      .def("digest", &PyChecksum::digest)
      .def_property_readonly("nbytes", &PyChecksum::nbytes);

  m.def(
      "checksum",
      [](const py::object& buffer, int threads) {
        BufferView b(buffer);
        Checksum c;
        {
          py::gil_scoped_release nogil;
          c.update(b.data(), b.size(), threads);
        }
        return c.digest();
      },
      "buffer"_a, "threads"_a = 1, "Checksum of a contiguous buffer's bytes (GIL released).");

  m.def(
      "hash_keys",
      [](py::array_t<uint64_t, py::array::c_style | py::array::forcecast> values, uint64_t seed, uint64_t field_id,
         uint64_t buckets) {
        const auto v = values.unchecked<1>();
        py::array_t<uint64_t> out(v.shape(0));
        auto o = out.mutable_unchecked<1>();
        const uint64_t salt = field_salt(seed, field_id);
        const Bucketer b(buckets ? buckets : 1);
        for (py::ssize_t i = 0; i < v.shape(0); ++i) {
          const uint64_t k = hash_key(v(i), salt);
          o(i) = buckets ? b.mod(k) : k;
        }
        return out;
      },
      "values"_a, "seed"_a, "field_id"_a, "buckets"_a = 0,
      "hash_key(value, seed, field_id) of mlfast.hashing for uint64 values; with buckets > 0, key % buckets.");

  m.def(
      "hash_text",
      [](const std::vector<std::string>& texts, uint64_t seed, uint64_t field_id) {
        py::array_t<uint64_t> out(static_cast<py::ssize_t>(texts.size()));
        auto o = out.mutable_unchecked<1>();
        const uint64_t salt = field_salt(seed, field_id);
        for (size_t i = 0; i < texts.size(); ++i)
          o(i) = hash_key(fnv1a64(reinterpret_cast<const unsigned char*>(texts[i].data()), texts[i].size()), salt);
        return out;
      },
      "texts"_a, "seed"_a, "field_id"_a, "hash_key(fnv1a64(utf-8 bytes), seed, field_id) for each text.");

  m.def(
      "int_features",
      [](py::array_t<int64_t, py::array::c_style | py::array::forcecast> values) {
        const auto v = values.unchecked<1>();
        py::array_t<float> dense(v.shape(0));
        py::array_t<int64_t> bucket(v.shape(0));
        auto d = dense.mutable_unchecked<1>();
        auto b = bucket.mutable_unchecked<1>();
        const IntTables& t = int_tables();
        for (py::ssize_t i = 0; i < v.shape(0); ++i) {
          const int64_t x = v(i);
          const bool small = static_cast<uint64_t>(x) < static_cast<uint64_t>(IntTables::kSize);
          d(i) = small ? t.dense[x] : signed_log1p_f32(x);
          b(i) = small ? t.bucket[x] : fuxictr_bucket(x);
        }
        return py::make_tuple(dense, bucket);
      },
      "values"_a, "The reader's (signed_log1p as float32, FuxiCTR bucket) of Criteo integers.");

  m.def("release_memory", &release_pool,
        "Unmap the released output buffers kept for reuse by later reads; returns the bytes freed.");

  m.def("parse_value", &parse_value, "kind"_a, "data"_a,
        "Parse one field's bytes as the reader does: (None, value) or (reason, None).");
}
