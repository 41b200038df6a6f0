#include "reader.hpp"

#include "hash_rows.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mlfast {

namespace {

// Bytes kept readable past the end of every block: the delimiter scan loads 64 bytes at a time
// and may run past the last line (the bits beyond it are masked off), and one more byte lets
// the reader append the '\n' a file's last line may lack.
constexpr size_t kPad = 128;

// ----------------------------------------------------------------------------------------------
// Byte scanning

// Bit i of *delims / *newlines is set when p[i] is the delimiter / '\n' (i < 64).
inline void scan64(const char* p, char delim, uint64_t* delims, uint64_t* newlines) {
#if defined(__SSE2__)
  const __m128i vd = _mm_set1_epi8(delim), vn = _mm_set1_epi8('\n');
  uint64_t d = 0, n = 0;
  for (int k = 0; k < 4; ++k) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k));
    d |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, vd)))) << (16 * k);
    n |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, vn)))) << (16 * k);
  }
  *delims = d;
  *newlines = n;
#else
  uint64_t d = 0, n = 0;
  for (int i = 0; i < 64; ++i) {
    d |= static_cast<uint64_t>(p[i] == delim) << i;
    n |= static_cast<uint64_t>(p[i] == '\n') << i;
  }
  *delims = d;
  *newlines = n;
#endif
}

// scan64, and bit i of *quotes set when p[i] is the quote byte (quoted logs).
inline void scan64_quote(const char* p, char delim, char quote, uint64_t* delims, uint64_t* newlines,
                         uint64_t* quotes) {
#if defined(__SSE2__)
  const __m128i vd = _mm_set1_epi8(delim), vn = _mm_set1_epi8('\n'), vq = _mm_set1_epi8(quote);
  uint64_t d = 0, n = 0, q = 0;
  for (int k = 0; k < 4; ++k) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * k));
    d |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, vd)))) << (16 * k);
    n |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, vn)))) << (16 * k);
    q |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, vq)))) << (16 * k);
  }
  *delims = d;
  *newlines = n;
  *quotes = q;
#else
  uint64_t d = 0, n = 0, q = 0;
  for (int i = 0; i < 64; ++i) {
    d |= static_cast<uint64_t>(p[i] == delim) << i;
    n |= static_cast<uint64_t>(p[i] == '\n') << i;
    q |= static_cast<uint64_t>(p[i] == quote) << i;
  }
  *delims = d;
  *newlines = n;
  *quotes = q;
#endif
}

int64_t count_newlines(const char* p, const char* e) {
  int64_t total = 0;
#if defined(__SSE2__)
  const __m128i nl = _mm_set1_epi8('\n'), zero = _mm_setzero_si128();
  while (e - p >= 64) {
    // Byte counters (each compare adds 1 where it matched) flushed before they can wrap.
    __m128i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    for (int k = 0; k < 255 && e - p >= 64; ++k, p += 64) {
      a0 = _mm_sub_epi8(a0, _mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), nl));
      a1 = _mm_sub_epi8(a1, _mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)), nl));
      a2 = _mm_sub_epi8(a2, _mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)), nl));
      a3 = _mm_sub_epi8(a3, _mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 48)), nl));
    }
    const __m128i s = _mm_add_epi64(_mm_add_epi64(_mm_sad_epu8(a0, zero), _mm_sad_epu8(a1, zero)),
                                    _mm_add_epi64(_mm_sad_epu8(a2, zero), _mm_sad_epu8(a3, zero)));
    total += _mm_cvtsi128_si64(s) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(s, s));
  }
#endif
  for (; p < e; ++p) total += *p == '\n';
  return total;
}

const char* find_last_newline(const char* p, size_t n) {
#if defined(__GLIBC__)
  return static_cast<const char*>(memrchr(p, '\n', n));
#else
  for (size_t i = n; i-- > 0;)
    if (p[i] == '\n') return p + i;
  return nullptr;
#endif
}

// Bytes read (and parsed) at a time: a few MiB per thread, so what read() just copied is still in
// the cache when the parser gets to it (a 64 MiB block would not be: ~5% slower). A chunk handed
// out is made of as many such blocks as fill ReaderSpec::block_bytes.
size_t read_size(const ReaderSpec& spec) {
  constexpr size_t kPerThread = size_t(2) << 20;
  return std::clamp<size_t>(kPerThread * static_cast<size_t>(std::max(spec.num_threads, 1)), 1,
                            std::max<size_t>(spec.block_bytes, 1));
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Input sources

class Source {
 public:
  virtual ~Source() = default;
  // Fills dst with up to n bytes; fewer only at the end of the input (0 = nothing left).
  virtual size_t read(char* dst, size_t n) = 0;
};

namespace {

class FileSource final : public Source {
 public:
  FileSource(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~FileSource() override { ::close(fd_); }
  size_t read(char* dst, size_t n) override {
    size_t got = 0;
    while (got < n) {
      const ssize_t r = ::read(fd_, dst + got, std::min(n - got, size_t(1) << 30));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw IoError(errno, path_, "read");
      }
      if (r == 0) break;
      got += static_cast<size_t>(r);
    }
    return got;
  }

 private:
  int fd_;
  std::string path_;
};

// Gzip through zlib's inflate on our own input buffer (not gzread), so that every kind of damage
// is found and located: a bad header, bad deflate data, a CRC or length mismatch in a member's
// trailer, a stream that stops mid-member (truncated), and bytes after the last member that are
// neither another member nor zero padding. Members are concatenated, as gzip(1) does.
class GzipSource final : public Source {
 public:
  GzipSource(int fd, std::string path) : fd_(fd), path_(std::move(path)), in_(kInBytes) {
    std::memset(&zs_, 0, sizeof zs_);
    if (inflateInit2(&zs_, 15 + 16) != Z_OK) {  // 16: gzip wrapper only (header, CRC-32, ISIZE)
      ::close(fd_);
      throw std::bad_alloc();
    }
  }
  ~GzipSource() override {
    inflateEnd(&zs_);
    ::close(fd_);
  }
  size_t read(char* dst, size_t n) override {
    size_t got = 0;
    while (got < n && !done_) {
      if (zs_.avail_in == 0 && !refill()) {
        if (in_member_) raise_truncated(dst, got);
        done_ = true;
        break;
      }
      if (!in_member_) {  // between members: another one, zero padding, or trailing garbage
        if (!next_member(dst, got)) break;
        continue;
      }
      const size_t want = std::min(n - got, size_t(1) << 30);
      zs_.next_out = reinterpret_cast<Bytef*>(dst + got);
      zs_.avail_out = static_cast<uInt>(want);
      const int rc = inflate(&zs_, Z_NO_FLUSH);
      got += want - zs_.avail_out;
      if (rc == Z_STREAM_END) {
        in_member_ = false;
      } else if (rc == Z_BUF_ERROR && zs_.avail_in == 0) {
        continue;  // needs more input (refilled above; the end of the file there is a truncation)
      } else if (rc == Z_MEM_ERROR) {
        throw std::bad_alloc();
      } else if (rc != Z_OK) {
        raise(dst, got, "corrupt gzip data", zs_.msg ? zs_.msg : zError(rc));
      }
    }
    account(dst, got);
    return got;
  }

 private:
  static constexpr size_t kInBytes = size_t(1) << 20;

  // More compressed input; false at the end of the file.
  bool refill() {
    if (eof_) return false;
    for (;;) {
      const ssize_t r = ::read(fd_, in_.data(), in_.size());
      if (r < 0) {
        if (errno == EINTR) continue;
        throw IoError(errno, path_, "read");
      }
      if (r == 0) {
        eof_ = true;
        return false;
      }
      file_pos_ += static_cast<uint64_t>(r);
      zs_.next_in = in_.data();
      zs_.avail_in = static_cast<uInt>(r);
      return true;
    }
  }
  uint64_t offset() const { return file_pos_ - zs_.avail_in; }  // of the next unconsumed byte

  // A member just ended and input follows: false when the rest of the file is zero padding.
  bool next_member(const char* dst, size_t got) {
    if (zs_.next_in[0] == 0) {
      // Zero padding (tape blocks, preallocated files): allowed, but only zeros to the end.
      do {
        for (uInt i = 0; i < zs_.avail_in; ++i)
          if (zs_.next_in[i] != 0) {
            zs_.avail_in -= i;
            zs_.next_in += i;
            raise(dst, got, "trailing data after the end of the gzip stream", "neither a gzip member nor zeros");
          }
        zs_.avail_in = 0;
      } while (refill());
      done_ = true;
      return false;
    }
    if (zs_.next_in[0] != 0x1f) raise(dst, got, "trailing data after the end of the gzip stream", "not a gzip member");
    if (inflateReset(&zs_) != Z_OK) raise(dst, got, "corrupt gzip data", "inflateReset failed");
    in_member_ = true;  // inflate checks the rest of the header (0x8b, method, flags)
    return true;
  }

  void account(const char* dst, size_t got) {
    out_bytes_ += got;
    lines_ += count_newlines(dst, dst + got);
  }
  [[noreturn]] void raise_truncated(const char* dst, size_t got) {
    raise(dst, got, "truncated gzip data", "the compressed stream ends in the middle of a member");
  }
  [[noreturn]] void raise(const char* dst, size_t got, const char* what, const std::string& detail) {
    account(dst, got);  // what was decompressed before the damage was found counts towards its place
    const uint64_t at = offset();
    FormatError e(path_ + ": " + what + " at compressed byte " + std::to_string(at) + " (after " +
                      std::to_string(out_bytes_) + " decompressed bytes, in line " + std::to_string(lines_ + 1) +
                      "): " + detail,
                  path_);
    e.offset = static_cast<int64_t>(at);
    e.decompressed = static_cast<int64_t>(out_bytes_);
    e.line = lines_ + 1;
    done_ = true;
    throw e;
  }

  int fd_;
  std::string path_;
  std::vector<Bytef> in_;
  z_stream zs_;
  uint64_t file_pos_ = 0;   // compressed bytes read from the file
  uint64_t out_bytes_ = 0;  // decompressed bytes handed out
  int64_t lines_ = 0;       // newlines in them
  bool in_member_ = true;   // the file starts with a member (open_source saw its magic)
  bool eof_ = false;
  bool done_ = false;
};

std::unique_ptr<Source> open_source(const std::string& path, bool* gzip, uint64_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(errno, path, "open");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw IoError(err, path, "stat");
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw IoError(EISDIR, path, "open");
  }
  *size = S_ISREG(st.st_mode) ? static_cast<uint64_t>(st.st_size) : 0;
  // Decide by content, not by name: a .gz that is not gzip, or gzip without the suffix, both work.
  unsigned char magic[2] = {0, 0};
  if (::pread(fd, magic, 2, 0) == 2 && magic[0] == 0x1f && magic[1] == 0x8b) {
    *gzip = true;
    *size = 0;
    return std::make_unique<GzipSource>(fd, path);
  }
#if defined(POSIX_FADV_SEQUENTIAL)
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
  *gzip = false;
  return std::make_unique<FileSource>(fd, path);
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// RowBuffer and the pool of released mappings

namespace {

constexpr size_t kPageBytes = 4096;
constexpr size_t kMapMin = size_t(4) << 20;  // smaller buffers come from malloc

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

#if defined(__linux__)
struct Pool {
  std::mutex mu;
  std::vector<RowMemory> free;
  size_t bytes = 0;
  size_t cap = 0;
};

Pool& pool() {
  // Never destroyed: numpy may free arrays during interpreter shutdown, after static destructors.
  static Pool* p = [] {
    auto* q = new Pool;
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    const size_t phys = pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
    q->cap = std::min<size_t>(size_t(1) << 30, phys / 16);
    return q;
  }();
  return *p;
}

// A mapping of at least `bytes` (a page multiple): the pooled one closest in size, so its pages
// are already faulted in (grown in place if a little small; a larger one is kept whole, its
// spare pages are room to grow into), else a fresh one.
RowMemory take_mapping(size_t bytes) {
  Pool& p = pool();
  RowMemory m;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    size_t best = p.free.size();
    auto better = [&](size_t b, size_t than) {
      if (than >= bytes) return b >= bytes && b < than;  // the smallest that fits
      return b > than;                                    // else the largest that does not
    };
    for (size_t i = 0; i < p.free.size(); ++i) {
      const size_t b = p.free[i].bytes;
      if (b * 2 < bytes || b > 4 * bytes) continue;  // too far off: fresh pages cost less than waste
      if (best == p.free.size() || better(b, p.free[best].bytes)) best = i;
    }
    if (best < p.free.size()) {
      m = p.free[best];
      p.free.erase(p.free.begin() + static_cast<std::ptrdiff_t>(best));
      p.bytes -= m.bytes;
    }
  }
  if (m.ptr != nullptr && m.bytes < bytes) {
    void* q = ::mremap(m.ptr, m.bytes, bytes, MREMAP_MAYMOVE);
    if (q == MAP_FAILED) {
      ::munmap(m.ptr, m.bytes);
      m = RowMemory{};
    } else {
      m.ptr = q;
      m.bytes = bytes;
    }
  }
  if (m.ptr == nullptr) {
    void* q = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q == MAP_FAILED) throw std::bad_alloc();
    m = RowMemory{q, bytes, true};
  }
  return m;
}
#endif

}  // namespace

void free_rows(RowMemory m) noexcept {
  if (m.ptr == nullptr) return;
  if (!m.mapped) {
    std::free(m.ptr);
    return;
  }
#if defined(__linux__)
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.bytes + m.bytes <= p.cap) {
      try {
        p.free.push_back(m);
        p.bytes += m.bytes;
        return;
      } catch (...) {
      }
    }
  }
  ::munmap(m.ptr, m.bytes);
#endif
}

size_t release_pool() noexcept {
#if defined(__linux__)
  Pool& p = pool();
  std::vector<RowMemory> all;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    all.swap(p.free);
    p.bytes = 0;
  }
  size_t n = 0;
  for (const RowMemory& m : all) {
    ::munmap(m.ptr, m.bytes);
    n += m.bytes;
  }
  return n;
#else
  return 0;
#endif
}

RowBuffer& RowBuffer::operator=(RowBuffer&& o) noexcept {
  if (this != &o) {
    free_rows(release());
    row_bytes_ = o.row_bytes_;
    const RowMemory m = o.release();
    p_ = static_cast<char*>(m.ptr);
    bytes_ = m.bytes;
    mapped_ = m.mapped;
    cap_ = row_bytes_ ? static_cast<int64_t>(bytes_ / row_bytes_) : 0;
  }
  return *this;
}

void RowBuffer::reserve_rows(int64_t rows) {
  if (row_bytes_ == 0 || rows <= cap_) return;
  const int64_t want = std::max<int64_t>(rows, cap_ + cap_ / 2);
  size_t bytes = static_cast<size_t>(want) * row_bytes_;
#if defined(__linux__)
  if (bytes >= kMapMin) {
    bytes = round_up(bytes, kPageBytes);
    if (mapped_) {
      void* q = ::mremap(p_, bytes_, bytes, MREMAP_MAYMOVE);
      if (q == MAP_FAILED) throw std::bad_alloc();
      p_ = static_cast<char*>(q);
    } else {
      const RowMemory m = take_mapping(bytes);
      if (p_ != nullptr) std::memcpy(m.ptr, p_, bytes_);  // under kMapMin
      std::free(p_);
      p_ = static_cast<char*>(m.ptr);
      mapped_ = true;
      bytes = m.bytes;
    }
    bytes_ = bytes;
    cap_ = static_cast<int64_t>(bytes / row_bytes_);
    return;
  }
#endif
  void* q = std::realloc(p_, bytes);
  if (q == nullptr) throw std::bad_alloc();
  p_ = static_cast<char*>(q);
  bytes_ = bytes;
  cap_ = want;
}

void RowBuffer::shrink_to(int64_t rows) {
  if (row_bytes_ == 0 || rows >= cap_) return;
  if (rows == 0) {
    free_rows(release());
    return;
  }
  size_t bytes = static_cast<size_t>(rows) * row_bytes_;
#if defined(__linux__)
  if (mapped_) {
    bytes = round_up(bytes, kPageBytes);
    if (bytes >= bytes_) return;
    if (::mremap(p_, bytes_, bytes, 0) == MAP_FAILED) return;  // shrinking in place never moves
    bytes_ = bytes;
    cap_ = static_cast<int64_t>(bytes / row_bytes_);
    return;
  }
#endif
  if (void* q = std::realloc(p_, bytes)) {
    p_ = static_cast<char*>(q);
    bytes_ = bytes;
    cap_ = rows;
  }
}

void BagValues::grow(int64_t size) {
  // One push per id: the array doubles so that growing stays rare (large ones grow by remapping,
  // without a copy, see RowBuffer).
  ids_.reserve_rows(std::max<int64_t>({size, 2 * size_, 4096}));
}

void BagValues::append(BagValues* other) {
  if (other->size_ > 0) {
    ids_.reserve_rows(size_ + other->size_);
    std::memcpy(ids_.row(size_), other->ids_.row(0), static_cast<size_t>(other->size_) * sizeof(int64_t));
    size_ += other->size_;
  }
  other->size_ = 0;
}

void ByteValues::append(ByteValues* other) {
  if (other->size_ > 0) {
    bytes_.reserve_rows(size_ + other->size_);
    std::memcpy(bytes_.row(size_), other->bytes_.row(0), static_cast<size_t>(other->size_));
    size_ += other->size_;
  }
  other->size_ = 0;
}

// ----------------------------------------------------------------------------------------------
// BlockReader

BlockReader::BlockReader(const std::string& path, size_t block_bytes, bool prefetch)
    : path_(path), block_bytes_(std::max<size_t>(block_bytes, 1)), prefetch_(prefetch) {
  src_ = open_source(path, &gzip_, &size_);
}

BlockReader::~BlockReader() {
  if (thread_.joinable()) thread_.join();
}

char* BlockReader::reserve(int b, size_t bytes) {
  bufs_[b].reserve_rows(static_cast<int64_t>(bytes + kPad));
  return bufs_[b].row(0);
}

BlockReader::Block BlockReader::fill(int b) {
  // The previous block's partial last line (the carry) opens this block.
  size_t len = carry_len_;
  size_t target = len + block_bytes_;
  char* p = reserve(b, target);
  if (carry_buf_ == b)
    std::memmove(p, p + carry_off_, len);
  else
    std::memcpy(p, bufs_[carry_buf_].row(static_cast<int64_t>(carry_off_)), len);
  carry_buf_ = b;
  carry_off_ = carry_len_ = 0;
  size_t scan_from = len;  // the carry holds no '\n'
  for (;;) {
    p = bufs_[b].row(0);
    while (len < target && !eof_) {
      const size_t r = src_->read(p + len, target - len);
      if (r == 0) eof_ = true;
      len += r;
    }
    if (eof_) {
      if (len > 0 && p[len - 1] != '\n') p[len++] = '\n';  // the last line may lack its '\n'
      return Block{p, len};
    }
    if (const char* nl = find_last_newline(p + scan_from, len - scan_from)) {
      const size_t block_len = static_cast<size_t>(nl - p) + 1;
      carry_off_ = block_len;
      carry_len_ = len - block_len;
      return Block{p, block_len};
    }
    // One line longer than a block: keep reading until it ends.
    scan_from = len;
    target = len + std::max(block_bytes_, len);
    reserve(b, target);
  }
}

BlockReader::Block BlockReader::next() {
  Block blk;
  if (pending_) {
    thread_.join();
    pending_ = false;
    if (pending_error_) {
      std::exception_ptr e = pending_error_;
      pending_error_ = nullptr;
      std::rethrow_exception(e);
    }
    cur_ ^= 1;
    blk = pending_block_;
  } else {
    blk = fill(cur_);
  }
  if (prefetch_ && blk.len > 0 && !(eof_ && carry_len_ == 0)) {
    // Read the next block into the other buffer while this one is parsed.
    const int other = cur_ ^ 1;
    thread_ = std::thread([this, other] {
      try {
        pending_block_ = fill(other);
      } catch (...) {
        pending_error_ = std::current_exception();
      }
    });
    pending_ = true;
  }
  return blk;
}

void BlockReader::verify_rest(uint64_t limit) {
  if (pending_) {
    thread_.join();
    pending_ = false;
    if (pending_error_) {
      std::exception_ptr e = pending_error_;
      pending_error_ = nullptr;
      std::rethrow_exception(e);
    }
  }
  if (eof_) return;
  std::vector<char> scratch(std::min<uint64_t>(limit, uint64_t(1) << 20));
  for (uint64_t seen = 0; seen < limit;) {
    const size_t r = src_->read(scratch.data(), std::min<uint64_t>(scratch.size(), limit - seen));
    if (r == 0) break;
    seen += r;
  }
}

std::string read_head(const std::string& path, size_t max_bytes, bool* gzip) {
  uint64_t size = 0;
  std::unique_ptr<Source> src = open_source(path, gzip, &size);
  std::string out(max_bytes, '\0');
  size_t got = 0;
  while (got < max_bytes) {
    const size_t r = src->read(&out[got], max_bytes - got);
    if (r == 0) break;
    got += r;
  }
  out.resize(got);
  return out;
}

// ----------------------------------------------------------------------------------------------
// parallel_for

void parallel_for(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    if (n == 1) fn(0);
    return;
  }
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  threads.reserve(n - 1);
  try {
    for (int i = 1; i < n; ++i)
      threads.emplace_back([&fn, &errors, i] {
        try {
          fn(i);
        } catch (...) {
          errors[i] = std::current_exception();
        }
      });
  } catch (...) {
    for (auto& t : threads) t.join();
    throw;
  }
  try {
    fn(0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// ----------------------------------------------------------------------------------------------
// Reader

Reader::Reader(const std::string& path, ReaderSpec spec)
    : spec_(std::move(spec)),
      keys_(spec_.keys),
      ncols_(static_cast<int>(spec_.columns.size())),
      num_sparse_(spec_.num_sparse()),
      num_bags_(spec_.num_bags),
      num_dense_(spec_.num_dense),
      blocks_(path, read_size(spec_), spec_.num_threads > 1),
      header_pending_(spec_.header) {
  if (ncols_ == 0) throw std::invalid_argument("reader spec has no columns");
  if (spec_.delimiter == '\n' || spec_.delimiter == '\r')
    throw std::invalid_argument("the delimiter cannot be a line break");
  if (spec_.buckets.size() != spec_.field_ids.size() || spec_.offsets.size() != spec_.field_ids.size() + 1)
    throw std::invalid_argument("field_ids, buckets and offsets disagree on the number of sparse fields");
  if (num_bags_ < 0 || num_sparse_ < 0)
    throw std::invalid_argument("num_bags must be between 0 and the number of fields (" +
                                std::to_string(spec_.field_ids.size()) + "), got " + std::to_string(num_bags_));
  if (num_bags_ > 0) {
    const char sep = spec_.bag_separator;
    if (sep == '\n' || sep == '\r') throw std::invalid_argument("the bag separator cannot be a line break");
    if (sep == spec_.delimiter)
      throw std::invalid_argument(std::string("the bag separator cannot be the delimiter ('") + sep + "')");
  }
  if (spec_.quote < -1 || spec_.quote > 255) throw std::invalid_argument("the quote must be a byte or -1 (none)");
  if (spec_.quote >= 0) {
    const char q = static_cast<char>(spec_.quote);
    if (q == '\n' || q == '\r') throw std::invalid_argument("the quote cannot be a line break");
    if (q == spec_.delimiter)
      throw std::invalid_argument(std::string("the quote cannot be the delimiter ('") + q + "')");
    if (num_bags_ > 0 && q == spec_.bag_separator)
      throw std::invalid_argument(std::string("the quote cannot be the bag separator ('") + q + "')");
  }
  if (spec_.num_threads < 1) throw std::invalid_argument("num_threads must be >= 1");
  if (spec_.id_column < -1 || spec_.id_column >= ncols_)
    throw std::invalid_argument("id_column " + std::to_string(spec_.id_column) + " is not one of the " +
                                std::to_string(ncols_) + " columns (or -1: none)");
  // Every output slot must be written by exactly one column, or a row would hold stale bytes.
  std::vector<int> dense_writers(num_dense_, 0), sparse_writers(num_sparse_, 0), bag_writers(num_bags_, 0);
  int labels = 0;
  for (const ColumnSpec& c : spec_.columns) {
    const bool dense = c.kind == Kind::kInt || c.kind == Kind::kFloat;
    const bool sparse = c.kind == Kind::kHex || c.kind == Kind::kText || c.kind == Kind::kHour ||
                        (c.kind == Kind::kInt && c.sparse >= 0);
    const int width = c.kind == Kind::kHour ? 3 : 1;
    const bool at_bag = c.sparse >= num_sparse_ && c.sparse < num_sparse_ + num_bags_;
    if (c.kind == Kind::kLabel) ++labels;
    if (dense) {
      if (c.dense < 0 || c.dense >= num_dense_) throw std::invalid_argument("column " + c.name + ": bad dense index");
      ++dense_writers[c.dense];
    }
    if (c.kind == Kind::kTextSeq) {
      if (!at_bag)
        throw std::invalid_argument("column " + c.name + ": a textseq column's sparse index must be a bag field (" +
                                    std::to_string(num_sparse_) + " .. " +
                                    std::to_string(num_sparse_ + num_bags_ - 1) + "), got " +
                                    std::to_string(c.sparse));
      ++bag_writers[c.sparse - num_sparse_];
    } else if (at_bag) {
      throw std::invalid_argument("column " + c.name + ": sparse index " + std::to_string(c.sparse) +
                                  " is a bag field, which only a textseq column can write");
    }
    if (sparse) {
      if (c.sparse < 0 || c.sparse + width > num_sparse_)
        throw std::invalid_argument("column " + c.name + ": bad sparse index");
      for (int k = 0; k < width; ++k) ++sparse_writers[c.sparse + k];
    }
  }
  if (labels != (spec_.has_label ? 1 : 0)) throw std::invalid_argument("label column count disagrees with has_label");
  for (int w : dense_writers)
    if (w != 1) throw std::invalid_argument("each dense column needs exactly one writer");
  for (int w : sparse_writers)
    if (w != 1) throw std::invalid_argument("each sparse field needs exactly one writer");
  for (int w : bag_writers)
    if (w != 1) throw std::invalid_argument("each bag field needs exactly one textseq column");
  for (int f = 0; f < num_sparse_ + num_bags_; ++f) {
    if (spec_.buckets[f] < 1) throw std::invalid_argument("buckets must be >= 1");
    fields_.push_back(Field{field_salt(spec_.seed, spec_.field_ids[f]), Bucketer(spec_.buckets[f]),
                            spec_.offsets[f] + 1, keys_ ? 0 : spec_.offsets[f]});
  }
  cols_.reserve(ncols_);
  for (const ColumnSpec& c : spec_.columns) cols_.push_back(Col{c.kind, c.log, c.dense, c.sparse});
  for (int c = 0; c < ncols_; ++c)
    if (cols_[c].kind == Kind::kTextSeq) bag_cols_.push_back(c);
  for (int c = 0; c < ncols_; ++c) {
    if (!runs_.empty() && runs_.back().kind == cols_[c].kind)
      runs_.back().end = c + 1;
    else
      runs_.push_back(Run{cols_[c].kind, c, c + 1});
  }
  tables_ = &int_tables();
  // The vector hash reduces with a mask, so it needs power-of-two bucket counts (the defaults)
  // in the one-hot fields it hashes (bag ids are hashed one by one as they are parsed).
  bool pow2 = true;
  for (int f = 0; f < num_sparse_; ++f) pow2 = pow2 && (spec_.buckets[f] & (spec_.buckets[f] - 1)) == 0;
  vector_hash_ = spec_.vector_hash && num_sparse_ > 0 && (keys_ || pow2) && avx512_hash_available();
  const int padded = FieldTables::padded(num_sparse_);
  tables4_.salt.assign(padded, 0);
  tables4_.mask.assign(padded, 0);
  tables4_.base.assign(padded, 0);
  tables4_.missing.assign(padded, 0);
  for (int f = 0; f < num_sparse_; ++f) {
    tables4_.salt[f] = fields_[f].salt;
    tables4_.mask[f] = spec_.buckets[f] - 1;
    tables4_.base[f] = fields_[f].base;
    tables4_.missing[f] = fields_[f].missing;
  }
}

Chunk Reader::new_chunk() const {
  Chunk c;
  c.labels = RowBuffer(spec_.has_label ? sizeof(float) : 0);
  c.dense = RowBuffer(sizeof(float) * num_dense_);
  c.missing = RowBuffer(num_dense_);
  c.sparse = RowBuffer(sizeof(int64_t) * num_sparse_);
  c.bag_lengths = RowBuffer(sizeof(int64_t) * num_bags_);
  c.bags.resize(num_bags_);
  c.id_lengths = RowBuffer(spec_.id_column >= 0 ? sizeof(int64_t) : 0);
  c.first_line = next_line_;
  return c;
}

bool Reader::next_chunk(Chunk* out) {
  // Read blocks until the chunk covers block_bytes of input. Blocks that yield no rows (a header,
  // bad lines being skipped) fold into the next chunk, so every chunk has rows, except a last
  // one that only carries the skip counts of the tail.
  Chunk c = new_chunk();
  while (!done_ && (c.rows == 0 || c.input_bytes < spec_.block_bytes)) {
    const BlockReader::Block b = blocks_.next();
    if (b.len == 0) {
      done_ = true;
      break;
    }
    parse_block(b, &c, spec_.block_bytes);
  }
  if (c.rows == 0 && next_line_ == c.first_line) return false;
  c.end_line = next_line_;
  c.labels.shrink_to(c.rows);
  c.dense.shrink_to(c.rows);
  c.missing.shrink_to(c.rows);
  c.sparse.shrink_to(c.rows);
  c.bag_lengths.shrink_to(c.rows);
  for (BagValues& b : c.bags) b.shrink();
  c.lines.shrink_to(c.rows);
  c.id_lengths.shrink_to(c.rows);
  c.ids.shrink();
  *out = std::move(c);
  return true;
}

void Reader::read_all(Chunk* out) {
  Chunk c = new_chunk();
  while (!done_) {
    const BlockReader::Block b = blocks_.next();
    if (b.len == 0) {
      done_ = true;
      break;
    }
    parse_block(b, &c, blocks_.size());
  }
  c.end_line = next_line_;
  c.labels.shrink_to(c.rows);
  c.dense.shrink_to(c.rows);
  c.missing.shrink_to(c.rows);
  c.sparse.shrink_to(c.rows);
  c.bag_lengths.shrink_to(c.rows);
  for (BagValues& b : c.bags) b.shrink();
  c.lines.shrink_to(c.rows);
  c.id_lengths.shrink_to(c.rows);
  c.ids.shrink();
  *out = std::move(c);
}

void Reader::reserve(Chunk* c, int64_t rows) const {
  c->labels.reserve_rows(rows);
  c->dense.reserve_rows(rows);
  c->missing.reserve_rows(rows);
  c->sparse.reserve_rows(rows);
  c->bag_lengths.reserve_rows(rows);
  c->lines.reserve_rows(rows);
  c->id_lengths.reserve_rows(rows);
}

int64_t Reader::capacity(const Chunk& c) const {
  return std::min({c.labels.capacity(), c.dense.capacity(), c.missing.capacity(), c.sparse.capacity(),
                   c.bag_lengths.capacity(), c.lines.capacity(), c.id_lengths.capacity()});
}

Reader::Out Reader::out_at(const Chunk& c, int64_t r) const {
  return Out{reinterpret_cast<float*>(c.labels.row(r)), reinterpret_cast<float*>(c.dense.row(r)),
             reinterpret_cast<uint8_t*>(c.missing.row(r)), reinterpret_cast<int64_t*>(c.sparse.row(r)),
             reinterpret_cast<int64_t*>(c.bag_lengths.row(r)), reinterpret_cast<int64_t*>(c.lines.row(r)),
             reinterpret_cast<int64_t*>(c.id_lengths.row(r))};
}

void Reader::parse_block(const BlockReader::Block& b, Chunk* c, uint64_t expect_bytes) {
  const char* s = b.data;
  const char* const e = b.data + b.len;
  c->input_bytes += b.len;
  if (at_start_) {
    at_start_ = false;
    if (e - s >= 3 && static_cast<unsigned char>(s[0]) == 0xEF && static_cast<unsigned char>(s[1]) == 0xBB &&
        static_cast<unsigned char>(s[2]) == 0xBF)
      s += 3;  // UTF-8 byte-order mark
  }
  while (header_pending_ && s < e) {
    const char* nl = static_cast<const char*>(std::memchr(s, '\n', e - s));  // blocks end with '\n'
    size_t n = static_cast<size_t>(nl - s);
    if (n > 0 && s[n - 1] == '\r') --n;
    if (n == 0)
      ++c->skipped[kBlankLine];
    else
      header_pending_ = false;
    ++next_line_;
    s = nl + 1;
  }
  if (s >= e) return;
  const size_t bytes = static_cast<size_t>(e - s);
  if (bytes_per_row_ == 0) {  // the first block: estimate from its first MiB
    const size_t sample = std::min<size_t>(bytes, size_t(1) << 20);
    bytes_per_row_ = static_cast<double>(sample) / static_cast<double>(std::max<int64_t>(count_newlines(s, s + sample), 1));
  }
  // Size the output once for all the bytes the chunk should cover (the whole file for read_all),
  // so it is mapped or taken from the pool once rather than grown block by block.
  if (expect_bytes > c->input_bytes)
    reserve(c, c->rows + static_cast<int64_t>(static_cast<double>(expect_bytes - c->input_bytes + bytes) /
                                              bytes_per_row_ * 1.03) + 16);
  const int64_t row0 = c->rows;

  // One range of whole lines per thread.
  const size_t want = bytes / std::max<size_t>(spec_.min_range_bytes, 1);
  const int threads = static_cast<int>(std::clamp<size_t>(want, 1, static_cast<size_t>(spec_.num_threads)));
  std::vector<const char*> cut{s};
  for (int i = 1; i < threads; ++i) {
    const char* t = std::max(s + bytes / threads * i, cut.back());
    const char* nl = static_cast<const char*>(std::memchr(t, '\n', e - t));
    if (nl == nullptr || nl + 1 >= e) break;
    cut.push_back(nl + 1);
  }
  cut.push_back(e);
  const int ranges = static_cast<int>(cut.size()) - 1;

  if (ranges == 1) {
    // One thread needs no newline count: size the output from the bytes per row seen so far;
    // if that falls short the parser stops at a line boundary and goes on once the output
    // has grown.
    const char* p = s;
    int64_t line = next_line_;
    for (;;) {
      const double per_row = bytes_per_row_ / 1.05;
      reserve(c, c->rows + static_cast<int64_t>(static_cast<double>(e - p) / per_row) + 16);
      const Result r =
          parse_range(p, e, line, out_at(*c, c->rows), capacity(*c) - c->rows, c->bags.data(), &c->ids);
      if (r.failed) {
        done_ = true;
        fail_checked(r);
      }
      c->rows += r.rows;
      line += r.lines;
      for (int k = 0; k < kNumReasons; ++k) c->skipped[k] += r.skipped[k];
      if (r.rows > 0) bytes_per_row_ = static_cast<double>((r.stop ? r.stop : e) - p) / static_cast<double>(r.rows);
      if (r.stop == nullptr) break;
      p = r.stop;
    }
    next_line_ = line;
    return;
  }

  // Several ranges: a parallel newline count says where each range's rows start.
  std::vector<int64_t> first(ranges + 1, 0);
  std::vector<int64_t> lines(ranges);
  parallel_for(ranges, [&](int i) { lines[i] = count_newlines(cut[i], cut[i + 1]); });
  for (int i = 0; i < ranges; ++i) first[i + 1] = first[i] + lines[i];
  reserve(c, row0 + first[ranges]);
  // Bag ids have no fixed place per row: the first range appends them to the chunk's, the others
  // to their own arrays, appended to the chunk's in file order once all are done.
  if (num_bags_ > 0) {
    range_bags_.resize(ranges - 1);
    for (std::vector<BagValues>& bags : range_bags_) {
      bags.resize(num_bags_);
      for (BagValues& b : bags) b.truncate(0);  // a failed block may have left ids behind
    }
  }
  if (spec_.id_column >= 0) {
    range_ids_.resize(ranges - 1);
    for (ByteValues& ids : range_ids_) ids.truncate(0);
  }
  std::vector<Result> results(ranges);
  parallel_for(ranges, [&](int i) {
    BagValues* bags = i == 0 ? c->bags.data() : num_bags_ > 0 ? range_bags_[i - 1].data() : nullptr;
    ByteValues* ids = i == 0 ? &c->ids : spec_.id_column >= 0 ? &range_ids_[i - 1] : nullptr;
    results[i] =
        parse_range(cut[i], cut[i + 1], next_line_ + first[i], out_at(*c, row0 + first[i]), lines[i], bags, ids);
  });
  // The ranges run in file order, so the first failed range holds the file's first bad line.
  for (const Result& r : results)
    if (r.failed) {
      done_ = true;
      fail_checked(r);
    }
  for (std::vector<BagValues>& bags : range_bags_)
    for (int s = 0; s < num_bags_; ++s) c->bags[s].append(&bags[s]);
  if (spec_.id_column >= 0)
    for (ByteValues& ids : range_ids_) c->ids.append(&ids);

  // Close the gaps skipped and blank lines left at the end of each range's slice.
  int64_t dst = row0;
  for (int i = 0; i < ranges; ++i) {
    const int64_t src = row0 + first[i];
    const int64_t n = results[i].rows;
    if (dst != src && n > 0) {
      for (RowBuffer* buf : {&c->labels, &c->dense, &c->missing, &c->sparse, &c->bag_lengths, &c->lines,
                             &c->id_lengths})
        if (buf->row_bytes()) std::memmove(buf->row(dst), buf->row(src), static_cast<size_t>(n) * buf->row_bytes());
    }
    dst += n;
    for (int k = 0; k < kNumReasons; ++k) c->skipped[k] += results[i].skipped[k];
  }
  c->rows = dst;
  if (dst > row0) bytes_per_row_ = static_cast<double>(bytes) / static_cast<double>(dst - row0);
  next_line_ += first[ranges];
}

void Reader::fail_checked(const Result& r) {
  // Damage inside a deflate stream can decompress to garbage for a while before zlib notices (at
  // the latest at the member's CRC): a line of that garbage failing to parse is a symptom, and
  // the input is reported as corrupt if it is. Bounded, so that a genuine bad line early in a
  // huge file is not reported only after decompressing all of it.
  constexpr uint64_t kVerifyBytes = uint64_t(256) << 20;
  if (blocks_.gzip()) {
    try {
      blocks_.verify_rest(kVerifyBytes);
    } catch (FormatError& e) {
      e.msg += "; line " + std::to_string(r.fail_line) + " did not parse (" + kReasonNames[r.fail_reason] +
               "), which the damage may explain";
      throw;
    }
  }
  fail(r);
}

void Reader::fail(const Result& r) const {
  ParseFailure f;
  f.line = r.fail_line;
  f.reason = r.fail_reason;
  f.text = r.fail_text;
  f.found_fields = r.fail_found;
  f.expected_fields = ncols_;
  if (r.fail_column >= 0 && r.fail_column < ncols_) f.field = spec_.columns[r.fail_column].name;
  throw f;
}

// Parses a line whose field count is right: column c spans (ends[c], ends[c + 1]), ends[0] being
// the byte before the line and ends[c + 1] column c's delimiter or line end. Labels and
// dense values go to the row; a sparse value is left in vals[f] (absent[f] = 1 when the field is
// empty) for hash_row. Columns are visited as runs of one kind (Criteo: label, 13 integers,
// 26 hex ids), so the kind is switched on once per run, not once per field. Returns the first
// bad column (its reason in *why), or -1. Bag columns are left to parse_bags.
inline int Reader::parse_line(const uintptr_t* ends, float* label, float* dense, uint8_t* missing, uint64_t* vals,
                              uint8_t* absent, Reason* why) const {
  auto u = [ends](int c) { return reinterpret_cast<const unsigned char*>(ends[c] + 1); };
  auto len = [ends](int c) { return static_cast<size_t>(ends[c + 1] - ends[c] - 1); };
  for (const Run& run : runs_) {
    switch (run.kind) {
      case Kind::kIgnore:
      case Kind::kTextSeq:
        break;
      case Kind::kLabel:
        for (int c = run.begin; c < run.end; ++c)
          if ((*why = parse_label(u(c), len(c), label)) != kOk) return c;
        break;
      case Kind::kInt:
        for (int c = run.begin; c < run.end; ++c) {
          const Col& col = cols_[c];
          const size_t n = len(c);
          int64_t x;  // 0 when empty: dense 0.0, and the mask says missing
          if ((*why = parse_int64_padded(u(c), n, &x)) != kOk) return c;
          float d;
          int64_t bucket;
          if (static_cast<uint64_t>(x) < static_cast<uint64_t>(IntTables::kSize)) {
            d = tables_->dense[x];
            bucket = tables_->bucket[x];
          } else {
            d = signed_log1p_f32(x);
            bucket = fuxictr_bucket(x);
          }
          dense[col.dense] = d;
          missing[col.dense] = n == 0;
          if (col.sparse >= 0) {
            vals[col.sparse] = static_cast<uint64_t>(bucket);
            absent[col.sparse] = n == 0;
          }
        }
        break;
      case Kind::kHex:
        for (int c = run.begin; c < run.end; ++c) {
          const int f = cols_[c].sparse;
          const size_t n = len(c);
          absent[f] = n == 0;
          if ((*why = parse_hex_padded(u(c), n, &vals[f])) != kOk) return c;
        }
        break;
      case Kind::kText:
        for (int c = run.begin; c < run.end; ++c) {
          const int f = cols_[c].sparse;
          const size_t n = len(c);
          absent[f] = n == 0;
          if ((*why = text_value(u(c), n, &vals[f])) != kOk) return c;
        }
        break;
      case Kind::kFloat:
        for (int c = run.begin; c < run.end; ++c) {
          const Col& col = cols_[c];
          const size_t n = len(c);
          double v = 0.0;
          if (n > 0) {
            if ((*why = parse_float(u(c), n, &v)) != kOk) return c;
            if (col.log) v = v >= 0 ? std::log1p(v) : -std::log1p(-v);
          }
          dense[col.dense] = static_cast<float>(v);
          missing[col.dense] = n == 0;
        }
        break;
      case Kind::kHour:
        for (int c = run.begin; c < run.end; ++c) {
          const int f = cols_[c].sparse;
          int64_t hour, weekday, weekend;
          if ((*why = parse_hour(u(c), len(c), &hour, &weekday, &weekend)) != kOk) return c;
          vals[f] = static_cast<uint64_t>(hour);
          vals[f + 1] = static_cast<uint64_t>(weekday);
          vals[f + 2] = static_cast<uint64_t>(weekend);
          absent[f] = absent[f + 1] = absent[f + 2] = 0;
        }
        break;
    }
  }
  *why = kOk;
  return -1;
}

// A kTextSeq cell of bag field f (see parse_bag_cell).
Reason Reader::parse_bag(const unsigned char* p, size_t n, int f, BagValues* bag, int64_t* length) const {
  return parse_bag_cell(p, n, spec_.bag_separator, fields_[f], keys_, bag, length);
}

// The bag columns of a line whose other columns parse_line has parsed (bad_col: its verdict, the
// reason in *why). Those left of bad_col are parsed in column order; a bad one is the line's first
// problem, so its column is returned and its reason set instead. A good line's ids stay in
// out->bags and out->lengths moves on to the next row; a bad line's ids are taken back, so a
// dropped line leaves nothing behind. A pass of its own, kept out of parse_range, so that the hot
// loop of a log without bags compiles as before (with this inlined, Criteo parsed ~3% slower).
__attribute__((noinline)) int Reader::parse_bags(const uintptr_t* ends, int bad_col, Reason* why, BagOut* out) const {
  int64_t* const lengths = out->lengths;
  size_t done = 0;  // bag columns parsed
  for (; done < bag_cols_.size(); ++done) {
    const int c = bag_cols_[done];
    if (bad_col >= 0 && c > bad_col) break;
    const int f = cols_[c].sparse;
    const int s = f - num_sparse_;
    const Reason r = parse_bag(reinterpret_cast<const unsigned char*>(ends[c] + 1),
                               static_cast<size_t>(ends[c + 1] - ends[c] - 1), f, &out->bags[s], &lengths[s]);
    if (r != kOk) {
      *why = r;
      bad_col = c;
      break;
    }
  }
  if (bad_col < 0) {
    out->lengths += num_bags_;
    return -1;
  }
  for (size_t k = 0; k < done; ++k) {
    const int s = cols_[bag_cols_[k]].sparse - num_sparse_;
    out->bags[s].truncate(out->bags[s].size() - lengths[s]);
  }
  return bad_col;
}

// Hashes a parsed line's sparse values into its output row: one loop with no branch inside
// (missing fields are blended in with a mask), so the multiply chains of all fields overlap.
inline void Reader::hash_row(const uint64_t* vals, const uint8_t* absent, int64_t* sparse) const {
  if (vector_hash_) {
    hash_row_avx512(tables4_, num_sparse_, keys_, vals, absent, sparse);
    return;
  }
  const Field* fd = fields_.data();
  if (keys_) {
    for (int f = 0; f < num_sparse_; ++f) {
      const uint64_t key = hash_key(vals[f], fd[f].salt);
      const uint64_t keep = static_cast<uint64_t>(absent[f]) - 1;  // all ones unless missing
      sparse[f] = static_cast<int64_t>((key | (key == 0)) & keep);
    }
  } else {
    for (int f = 0; f < num_sparse_; ++f) {
      const int64_t id = fd[f].base + static_cast<int64_t>(fd[f].bucketer.mod(hash_key(vals[f], fd[f].salt)));
      const int64_t keep = static_cast<int64_t>(absent[f]) - 1;
      sparse[f] = (id & keep) | (fd[f].missing & ~keep);
    }
  }
}

// Out of the hot loop (called once per kept row, and only with an id column), so that parsing
// without one compiles as before.
__attribute__((noinline)) void Reader::keep_id(const uintptr_t* ends, int64_t* length, ByteValues* ids) const {
  const int c = spec_.id_column;
  const size_t n = static_cast<size_t>(ends[c + 1] - ends[c] - 1);
  ids->push(reinterpret_cast<const char*>(ends[c] + 1), n);
  *length = static_cast<int64_t>(n);
}

// Splits a line that holds the quote byte, field by field from the left: a field starting with
// the quote runs to the quote that is not doubled, which must be followed by the delimiter or the
// line end; any other field runs to the next delimiter, taken as it is. The slow path of quoted
// logs (lines without the quote byte never come here).
__attribute__((noinline)) Reader::Split Reader::split_quoted(const char* s, const char* e, char* out,
                                                             uintptr_t* ends) const {
  const char dl = spec_.delimiter, qc = static_cast<char>(spec_.quote);
  Split r;
  char* o = out;
  ends[0] = reinterpret_cast<uintptr_t>(out) - 1;
  const char* p = s;
  int f = 0;
  for (;;) {
    const char* const field = p;
    if (p < e && *p == qc) {
      ++p;
      for (;;) {
        const char* t = static_cast<const char*>(std::memchr(p, qc, static_cast<size_t>(e - p)));
        if (t == nullptr) {  // not closed on this line
          r.bad_field = f;
          r.bad_begin = field;
          r.bad_end = e;
          r.fields = f + 1;
          return r;
        }
        std::memcpy(o, p, static_cast<size_t>(t - p));
        o += t - p;
        p = t + 1;
        if (p < e && *p == qc) {  // "" stands for one quote
          *o++ = qc;
          ++p;
          continue;
        }
        break;
      }
      if (p < e && *p != dl) {  // closed, but the field goes on
        const char* t = static_cast<const char*>(std::memchr(p, dl, static_cast<size_t>(e - p)));
        r.bad_field = f;
        r.bad_begin = field;
        r.bad_end = t ? t : e;
        r.fields = f + 1;
        return r;
      }
    } else {
      const char* t = static_cast<const char*>(std::memchr(p, dl, static_cast<size_t>(e - p)));
      if (t == nullptr) t = e;
      std::memcpy(o, p, static_cast<size_t>(t - p));
      o += t - p;
      p = t;
    }
    if (f < ncols_) ends[f + 1] = reinterpret_cast<uintptr_t>(o);
    ++f;
    if (p == e) break;
    *o++ = dl;  // p is at a delimiter
    ++p;
  }
  r.fields = f;
  return r;
}

Reader::Result Reader::parse_range(const char* begin, const char* end, int64_t first_line, Out out,
                                   int64_t max_rows, BagValues* bags, ByteValues* ids) const {
  if (spec_.quote >= 0) {
    QuoteScratch scratch;
    scratch.ends.resize(ncols_ + 1);
    return parse_range_impl<true>(begin, end, first_line, out, max_rows, bags, ids, &scratch);
  }
  return parse_range_impl<false>(begin, end, first_line, out, max_rows, bags, ids, nullptr);
}

template <bool kQuoted>
Reader::Result Reader::parse_range_impl(const char* begin, const char* end, int64_t first_line, Out out,
                                        int64_t max_rows, BagValues* bags, ByteValues* ids,
                                        QuoteScratch* scratch) const {
  Result res;
  const int last = ncols_ - 1;
  const char delim = spec_.delimiter;
  const bool skip = spec_.skip_bad;
  const int F = num_sparse_, D = num_dense_;
  const bool with_bags = num_bags_ > 0;
  float* label = out.labels;
  float* dense = out.dense;
  uint8_t* missing = out.missing;
  int64_t* sparse = out.sparse;
  int64_t* row_line = out.lines;
  int64_t* id_length = out.id_lengths;
  const bool with_id = spec_.id_column >= 0;
  BagOut bag_out{bags, out.bag_lengths};
  // ends[0]: the byte before the line; ends[c + 1]: where column c ends (its delimiter or the
  // line end). Addresses as integers: ends[0] may point just before the buffer.
  std::vector<uintptr_t> end_buf(ncols_ + 1);
  std::vector<uint64_t> vals(FieldTables::padded(num_sparse_ + 1), 0);  // padded for hash_row_avx512
  std::vector<uint8_t> absent(FieldTables::padded(num_sparse_ + 1), 0);
  uintptr_t* const ends = end_buf.data();
  uintptr_t* const last_delim = ends + last;  // the slot of the last expected delimiter
  uintptr_t* next = ends + 1;                 // the slot of the next delimiter
  ends[0] = reinterpret_cast<uintptr_t>(begin) - 1;
  int64_t line = first_line;
  int64_t rows = 0;
  constexpr size_t kMaxText = 200;
  // Quoted logs: a line holding the quote byte is split by split_quoted into scratch->bytes
  // (padded as blocks are, for the parsers that load past a value), with its own ends.
  const char quote = static_cast<char>(spec_.quote);
  uint64_t quotes_seen = 0;  // quote bits of the current line, so far

  // Walk the input 64 bytes at a time with one bit mask of delimiters and one of newlines. For
  // each line, the delimiters below its newline bit are taken in a tight loop that only records
  // where fields end; the line is parsed once its field count is known to be right.
  const char* base = begin;
  uint64_t dm = 0, nm = 0, qm = 0;
  auto load = [&] {
    if constexpr (kQuoted)
      scan64_quote(base, delim, quote, &dm, &nm, &qm);
    else
      scan64(base, delim, &dm, &nm);
    const size_t rem = static_cast<size_t>(end - base);
    if (rem < 64) {
      const uint64_t keep = (uint64_t(1) << rem) - 1;
      dm &= keep;
      nm &= keep;
      if constexpr (kQuoted) qm &= keep;
    }
  };
  if (base < end) load();
  while (base < end) {
    const uint64_t nl_bit = nm & (0 - nm);  // this window's first newline, or 0
    uint64_t d = nl_bit ? dm & (nl_bit - 1) : dm;
    for (; d != 0; d &= d - 1) {
      if (next <= last_delim) *next = reinterpret_cast<uintptr_t>(base + __builtin_ctzll(d));
      ++next;
    }
    if constexpr (kQuoted) quotes_seen |= nl_bit ? qm & (nl_bit - 1) : qm;
    if (nl_bit == 0) {  // the line goes on in the next window
      base += 64;
      if (base < end) load();
      continue;
    }
    dm &= ~(nl_bit | (nl_bit - 1));
    if constexpr (kQuoted) qm &= ~(nl_bit | (nl_bit - 1));
    nm &= nm - 1;
    const char* q = base + __builtin_ctzll(nl_bit);
    {
      int col = static_cast<int>(next - ends) - 1;  // delimiters seen on this line (a quoted line: fields - 1)
      const char* line_start = reinterpret_cast<const char*>(ends[0] + 1);
      const char* fe = q;
      // A CR before the newline ("\r\n" endings) is never part of the last field (the
      // delimiter cannot be a CR, so the byte belongs to the last field, or is the whole line).
      if (fe > line_start && fe[-1] == '\r') --fe;
      Reason why = kOk;
      int bad_col = -1;
      const uintptr_t* le = ends;  // the line's column ends (its own, for a quoted line)
      Split split;
      bool bad_quote = false;
      if constexpr (kQuoted) {
        if (quotes_seen != 0) {  // split and unquote it; then parsed as any other line
          const size_t need = static_cast<size_t>(fe - line_start) + kPad;
          std::vector<char>& bytes = scratch->bytes;
          if (bytes.size() < need) bytes.resize(std::max(need, 2 * bytes.size()));
          split = split_quoted(line_start, fe, bytes.data(), scratch->ends.data());
          le = scratch->ends.data();
          col = split.fields - 1;  // a line with a quote is never blank
          bad_quote = split.bad_field >= 0;
        }
      }
      if (bad_quote) {
        why = kBadQuote;
        bad_col = split.bad_field < ncols_ ? split.bad_field : last;
      } else if (col != last) {
        if (col == 0 && fe == line_start) {
          ++res.skipped[kBlankLine];
          why = kBlankLine;
        } else {
          why = kFieldCount;
        }
      } else {
        if (rows == max_rows) {  // no room for this line: stop before it
          res.rows = rows;
          res.lines = line - first_line;
          res.stop = line_start;
          return res;
        }
        ends[ncols_] = reinterpret_cast<uintptr_t>(fe);  // (a quoted line's ends are set)
        bad_col = parse_line(le, label, dense, missing, vals.data(), absent.data(), &why);
        if (with_bags) bad_col = parse_bags(le, bad_col, &why, &bag_out);
      }
      if (why == kOk) {
        hash_row(vals.data(), absent.data(), sparse);
        *row_line++ = line;
        if (with_id) keep_id(le, id_length++, ids);
        ++rows;
        if (label) ++label;
        dense += D;
        missing += D;
        sparse += F;
      } else if (why != kBlankLine) {
        if (skip) {
          ++res.skipped[why];  // the row's slot is reused by the next line
        } else {
          res.failed = true;
          res.fail_line = line;
          res.fail_reason = why;
          res.fail_found = col + 1;
          if (why == kFieldCount) {
            res.fail_column = col < last ? col + 1 : last;  // first missing column / where extras begin
            res.fail_text.assign(line_start, std::min<size_t>(static_cast<size_t>(fe - line_start), kMaxText));
          } else if (kQuoted && why == kBadQuote) {  // the field's raw bytes
            res.fail_column = bad_col;
            res.fail_text.assign(split.bad_begin,
                                 std::min<size_t>(static_cast<size_t>(split.bad_end - split.bad_begin), kMaxText));
          } else {
            res.fail_column = bad_col;
            res.fail_text.assign(reinterpret_cast<const char*>(le[bad_col] + 1),
                                 std::min<size_t>(static_cast<size_t>(le[bad_col + 1] - le[bad_col] - 1), kMaxText));
          }
          res.rows = rows;
          res.lines = line - first_line + 1;
          return res;
        }
      }
      ++line;
      next = ends + 1;
      ends[0] = reinterpret_cast<uintptr_t>(q);
      if constexpr (kQuoted) quotes_seen = 0;
    }
  }
  res.rows = rows;
  res.lines = line - first_line;
  return res;
}

}  // namespace mlfast
