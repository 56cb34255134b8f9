#include "apr_file.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <future>
#include <string_view>

#include "crc32.hpp"
#include "errors.hpp"

namespace apr {
namespace {

constexpr uint64_t kHeaderSize = 64;

bool mul_ok(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool add_ok(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

uint64_t align64(uint64_t v) { return (v + 63) & ~uint64_t{63}; }  // callers keep v < 2^63

template <class T>
T load_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));  // little-endian host (static_assert in bindings.cpp)
  return v;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llX", static_cast<unsigned long long>(v));
  return buf;
}

std::string shape_str(const std::vector<uint64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Strict UTF-8 (no overlong forms, no surrogates, <= U+10FFFF).
bool valid_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    if (c < 0x80) { ++i; continue; }
    size_t len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return false;
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000)) return false;
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

bool dtype_from_code(uint8_t code, DType* out) {
  switch (code) {
    case 0: *out = DType::F32; return true;
    case 1: *out = DType::F16; return true;
    case 3: *out = DType::F64; return true;
    case 4: *out = DType::I32; return true;
    case 5: *out = DType::I64; return true;
    case 6: *out = DType::I8; return true;
    case 7: *out = DType::U8; return true;
    case 12: *out = DType::Q4_K; return true;
    case 14: *out = DType::Q6_K; return true;
    case 30: *out = DType::BF16; return true;
    case 8: case 128: *out = DType::APR_Q4; return true;   // 8: legacy code (before GH-438)
    case 9: case 129: *out = DType::APR_Q8; return true;
    default: return false;
  }
}

// A bounds-checked cursor over the index bytes.
struct Cursor {
  const std::string& path;
  const std::vector<uint8_t>& buf;
  uint64_t base;  // file offset of buf[0]
  size_t pos = 0;
  uint64_t entry = 0;
  std::string name;  // current entry's name once read, for messages

  std::string where() const {
    std::string w = path + ": tensor index entry " + std::to_string(entry);
    if (!name.empty()) w += " ('" + name + "')";
    return w;
  }
  const uint8_t* take(size_t n, const char* field) {
    if (buf.size() - pos < n)
      throw FormatError(where() + ": field " + field + " at file offset " + std::to_string(base + pos) +
                        " runs past the end of the index region (which ends at " +
                        std::to_string(base + buf.size()) + ", the data_offset or the end of the file)");
    const uint8_t* p = buf.data() + pos;
    pos += n;
    return p;
  }
};

}  // namespace

const char* dtype_name(DType d) noexcept {
  static const char* names[] = {"F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8",
                                "Q4_K", "Q6_K", "APR_Q4", "APR_Q8"};
  return names[static_cast<int>(d)];
}

bool expected_nbytes(DType d, const std::vector<uint64_t>& shape, uint64_t* out) noexcept {
  uint64_t n = 1;
  for (uint64_t dim : shape)
    if (!mul_ok(n, dim, &n)) return false;
  switch (d) {
    case DType::F32: case DType::I32: return mul_ok(n, 4, out);
    case DType::F16: case DType::BF16: return mul_ok(n, 2, out);
    case DType::F64: case DType::I64: return mul_ok(n, 8, out);
    case DType::I8: case DType::U8: *out = n; return true;
    case DType::APR_Q4: return mul_ok(n / 32 + (n % 32 != 0), 18, out);  // ceil(n/32) blocks of 18
    case DType::APR_Q8: return add_ok(n, 4, out);                       // f32 scale + n bytes
    case DType::Q4_K: case DType::Q6_K: {
      // Row-aligned GGML blocks (GH-370): rows x ceil(cols/256) x block bytes; 0-d/1-d are flat.
      uint64_t cols = shape.empty() ? 1 : shape.back();
      uint64_t rows = 1;
      for (size_t i = 0; i + 1 < shape.size(); ++i)
        if (!mul_ok(rows, shape[i], &rows)) return false;
      uint64_t blocks = cols / 256 + (cols % 256 != 0), b;
      uint64_t block_bytes = d == DType::Q4_K ? 144 : 210;
      return mul_ok(rows, blocks, &b) && mul_ok(b, block_bytes, out);
    }
  }
  return false;
}

AprFile::AprFile(const std::string& path, bool eager) : file_(std::make_shared<MappedFile>(path)) {
  parse_header();
  parse_index();
  check_layout();
  file_->load(eager);  // after validation: a malformed file is refused before any data is read
  // A file that shrank between fstat and here would SIGBUS later on access; catch what we can now.
  if (file_->current_size() < file_->size())
    throw FormatError(path + ": the file shrank while it was being opened (was " +
                      std::to_string(file_->size()) + " bytes, now " +
                      std::to_string(file_->current_size()) + ")");
}

void AprFile::parse_header() {
  const std::string& path = file_->path();
  const uint64_t fsize = file_->size();
  uint8_t h[kHeaderSize] = {0};
  file_->read_exact(0, h, static_cast<size_t>(std::min<uint64_t>(fsize, kHeaderSize)), "the header");

  // Magic first, so that a short v1/legacy file is still named correctly.
  if (fsize >= 4 && std::memcmp(h, "APRN", 4) == 0)
    throw FormatError(path + ": magic 'APRN' is the APR v1 classic-ML container (aprender "
                      "apr_format v1), not APR v2; this reader only reads APR v2 ('APR\\0')");
  if (fsize >= 4 && std::memcmp(h, "APR1", 4) == 0)
    throw FormatError(path + ": magic 'APR1' is the legacy APR1 format (whisper.apr / old "
                      "serialization::apr with a JSON index), not APR v2; this reader only reads APR v2");
  if (fsize < kHeaderSize)
    throw FormatError(path + ": file is " + std::to_string(fsize) +
                      " bytes, shorter than the 64-byte APR v2 header");
  const bool magic_v2 = std::memcmp(h, "APR\0", 4) == 0;
  if (!magic_v2 && std::memcmp(h, "APR2", 4) != 0)
    throw FormatError(path + ": bad magic " + hex(load_le<uint32_t>(h)) +
                      " at offset 0: expected 'APR\\0' (41 50 52 00) or the early v2 'APR2'");

  Header& hd = header_;
  std::memcpy(hd.magic, h, 4);
  hd.version_major = h[4];
  hd.version_minor = h[5];
  hd.flags = load_le<uint16_t>(h + 6);
  hd.tensor_count = load_le<uint32_t>(h + 8);
  hd.metadata_offset = load_le<uint64_t>(h + 12);
  hd.metadata_size = load_le<uint32_t>(h + 20);
  hd.tensor_index_offset = load_le<uint64_t>(h + 24);
  hd.data_offset = load_le<uint64_t>(h + 32);
  hd.checksum = load_le<uint32_t>(h + 40);

  // The legacy compressed wrapper shares 'APR\0' and has a compression code (0/1/2) at byte 4
  // (spec 2.1): tell it apart by metadata_offset, which is always 64 in v2.
  if (magic_v2 && hd.version_major <= 2 && hd.metadata_offset != kHeaderSize)
    throw FormatError(path + ": 'APR\\0' file whose metadata_offset is " +
                      std::to_string(hd.metadata_offset) +
                      " (expected 64): this looks like the legacy compressed APR wrapper (old "
                      "serialization::apr), not APR v2");
  if (hd.version_major != 2)
    throw FormatError(path + ": header field version is " + std::to_string(hd.version_major) + "." +
                      std::to_string(hd.version_minor) + ", expected major version 2");

  uint32_t crc = crc32_update(0, h, 40);
  crc = crc32_update(crc, h + 44, 20);
  header_crc_matches_ = crc == hd.checksum;
  // A zero checksum is tolerated: realizar's writer leaves it 0 (spec 13, reader checklist).
  if (!header_crc_matches_ && hd.checksum != 0)
    throw FormatError(path + ": header checksum mismatch: stored " + hex(hd.checksum) +
                      ", computed " + hex(crc) + " over header bytes [0,40)+[44,64)");

  if (hd.flags & flags::kColumnMajor)
    throw FormatError(path + ": header flags " + hex(hd.flags) +
                      " set LAYOUT_COLUMN_MAJOR (0x0800), which APR v2 forbids; expected row-major");
  if (hd.flags & (flags::kLz4 | flags::kZstd))
    throw FormatError(path + ": header flags " + hex(hd.flags) +
                      " mark the file as compressed (LZ4 0x0001 / ZSTD 0x0002); this reader only "
                      "reads uncompressed APR v2 (re-export it without compression)");
  if (hd.flags & flags::kEncrypted)
    throw FormatError(path + ": header flags " + hex(hd.flags) +
                      " mark the file as encrypted (0x0004); encrypted APR v2 is not supported");

  if (hd.tensor_count > limits::kMaxTensors)
    throw FormatError(path + ": header field tensor_count is " + std::to_string(hd.tensor_count) +
                      ", above the limit of " + std::to_string(limits::kMaxTensors) + " tensors");
  if (hd.metadata_size > limits::kMaxMetadata)
    throw FormatError(path + ": header field metadata_size is " + std::to_string(hd.metadata_size) +
                      " bytes, above the limit of " + std::to_string(limits::kMaxMetadata) + " bytes");
  const uint64_t meta_end = kHeaderSize + hd.metadata_size;  // no overflow: both small
  if (meta_end > fsize)
    throw FormatError(path + ": metadata [64, " + std::to_string(meta_end) + ") (metadata_size " +
                      std::to_string(hd.metadata_size) + ") runs past the end of the " +
                      std::to_string(fsize) + "-byte file");
  if (hd.tensor_index_offset < meta_end || hd.tensor_index_offset > fsize)
    throw FormatError(path + ": header field tensor_index_offset is " +
                      std::to_string(hd.tensor_index_offset) + ", expected a value in [" +
                      std::to_string(meta_end) + ", " + std::to_string(fsize) +
                      "] (after the metadata, inside the file)");
  if (hd.data_offset < hd.tensor_index_offset || hd.data_offset > fsize)
    throw FormatError(path + ": header field data_offset is " + std::to_string(hd.data_offset) +
                      ", expected a value in [" + std::to_string(hd.tensor_index_offset) + ", " +
                      std::to_string(fsize) + "] (after the tensor index, inside the file)");
  // A tensor index entry is at least 20 bytes, so the count is bounded by the index region too.
  const uint64_t region = hd.data_offset - hd.tensor_index_offset;
  if (uint64_t{hd.tensor_count} * 20 > region)
    throw FormatError(path + ": header field tensor_count is " + std::to_string(hd.tensor_count) +
                      " but the index region [tensor_index_offset, data_offset) holds only " +
                      std::to_string(region) + " bytes (each entry needs at least 20)");

  metadata_.resize(hd.metadata_size);
  if (hd.metadata_size) file_->read_exact(kHeaderSize, metadata_.data(), hd.metadata_size, "the metadata");
}

void AprFile::parse_index() {
  const std::string& path = file_->path();
  const Header& hd = header_;
  const uint64_t region = hd.data_offset - hd.tensor_index_offset;
  const uint64_t want = std::min<uint64_t>(region, uint64_t{hd.tensor_count} * limits::kMaxEntryBytes);
  std::vector<uint8_t> buf(static_cast<size_t>(want));
  if (want) file_->read_exact(hd.tensor_index_offset, buf.data(), buf.size(), "the tensor index");

  tensors_.reserve(hd.tensor_count);
  Cursor cur{path, buf, hd.tensor_index_offset, 0, 0, {}};
  for (uint64_t i = 0; i < hd.tensor_count; ++i) {
    cur.entry = i;
    cur.name.clear();
    const uint16_t name_len = load_le<uint16_t>(cur.take(2, "name_len"));
    if (name_len == 0) throw FormatError(cur.where() + ": name_len is 0, expected a non-empty name");
    if (name_len > limits::kMaxNameLen)
      throw FormatError(cur.where() + ": name_len is " + std::to_string(name_len) +
                        ", above the limit of " + std::to_string(limits::kMaxNameLen) + " bytes");
    const uint8_t* name = cur.take(name_len, "name");
    if (!valid_utf8(name, name_len))
      throw FormatError(cur.where() + ": tensor name is not valid UTF-8");
    TensorEntry e;
    e.name.assign(reinterpret_cast<const char*>(name), name_len);
    cur.name = e.name;
    e.code = *cur.take(1, "dtype");
    if (!dtype_from_code(e.code, &e.dtype)) {
      std::string why = e.code == 2 ? " (2 was BF16 in the oldest aprender and GGML Q4_0 elsewhere: "
                                      "ambiguous, refused)" : "";
      throw FormatError(cur.where() + ": unknown dtype code " + std::to_string(e.code) + why +
                        "; expected one of 0 F32, 1 F16, 3 F64, 4 I32, 5 I64, 6 I8, 7 U8, 12 Q4_K, "
                        "14 Q6_K, 30 BF16, 128/8 APR_Q4, 129/9 APR_Q8");
    }
    const uint8_t ndim = *cur.take(1, "ndim");
    if (ndim > limits::kMaxNdim)
      throw FormatError(cur.where() + ": ndim is " + std::to_string(ndim) + ", above the limit of " +
                        std::to_string(limits::kMaxNdim));
    const uint8_t* dims = cur.take(size_t{8} * ndim, "dims");
    e.shape.resize(ndim);
    for (unsigned d = 0; d < ndim; ++d) e.shape[d] = load_le<uint64_t>(dims + 8 * d);
    const uint64_t rel = load_le<uint64_t>(cur.take(8, "offset"));
    e.size = load_le<uint64_t>(cur.take(8, "size"));

    // torch needs every size and stride to fit int64 even when a zero dim makes the tensor empty:
    // bound the product of the dims with zeros counted as 1.
    uint64_t extent = 1;
    for (uint64_t d : e.shape)
      if (!mul_ok(extent, d ? d : 1, &extent) || extent > uint64_t{INT64_MAX})
        throw FormatError(cur.where() + ": shape " + shape_str(e.shape) +
                          " is too large (the product of its dims must stay below 2^63)");
    uint64_t need;
    if (!expected_nbytes(e.dtype, e.shape, &need))
      throw FormatError(cur.where() + ": shape " + shape_str(e.shape) + " of dtype " +
                        dtype_name(e.dtype) + " overflows 64-bit byte arithmetic");
    e.placeholder = e.size == 0 && need != 0;  // tied lm_head placeholder (spec 10.4)
    if (e.size != need && !e.placeholder)
      throw FormatError(cur.where() + ": size is " + std::to_string(e.size) + " bytes, expected " +
                        std::to_string(need) + " for dtype " + dtype_name(e.dtype) + " and shape " +
                        shape_str(e.shape));
    uint64_t end;
    if (!add_ok(hd.data_offset, rel, &e.offset) || !add_ok(e.offset, e.size, &end) ||
        end > file_->size())
      throw FormatError(cur.where() + ": data [data_offset + " + std::to_string(rel) + ", +" +
                        std::to_string(e.size) + ") lies outside the " + std::to_string(file_->size()) +
                        "-byte file (expected it to end by the end of the file)");
    tensors_.push_back(std::move(e));
  }
}

void AprFile::check_layout() {
  const std::string& path = file_->path();
  const uint64_t fsize = file_->size();
  const size_t n = tensors_.size();

  // Names: sorted is the norm; unsorted is tolerated (realizar's writer); duplicates never.
  std::vector<uint32_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
  for (size_t i = 1; i < n; ++i)
    if (tensors_[i - 1].name > tensors_[i].name) { sorted_ = false; break; }
  if (!sorted_)
    std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return tensors_[a].name < tensors_[b].name; });
  for (size_t i = 1; i < n; ++i)
    if (tensors_[order[i - 1]].name == tensors_[order[i]].name)
      throw FormatError(path + ": duplicate tensor name '" + tensors_[order[i]].name +
                        "' (index entries " + std::to_string(order[i - 1]) + " and " +
                        std::to_string(order[i]) + "); expected unique names");

  // Overlap: walk the non-empty tensors by start offset.
  std::vector<uint32_t> by_off;
  by_off.reserve(n);
  for (size_t i = 0; i < n; ++i)
    if (tensors_[i].size) by_off.push_back(static_cast<uint32_t>(i));
  std::sort(by_off.begin(), by_off.end(), [&](uint32_t a, uint32_t b) { return tensors_[a].offset < tensors_[b].offset; });
  uint64_t padded_end = header_.data_offset;
  data_end_ = header_.data_offset;
  size_t furthest = 0;  // the tensor seen so far that ends last (it may contain several others)
  for (size_t k = 0; k < by_off.size(); ++k) {
    const TensorEntry& t = tensors_[by_off[k]];
    if (k > 0) {
      const TensorEntry& prev = tensors_[by_off[furthest]];
      if (t.offset < prev.offset + prev.size)
        throw FormatError(path + ": tensor '" + t.name + "' (bytes [" + std::to_string(t.offset) + ", " +
                          std::to_string(t.offset + t.size) + ")) overlaps tensor '" + prev.name +
                          "' (bytes [" + std::to_string(prev.offset) + ", " +
                          std::to_string(prev.offset + prev.size) + ")); expected disjoint tensor data");
    }
    if (k == 0 || t.offset + t.size > tensors_[by_off[furthest]].offset + tensors_[by_off[furthest]].size)
      furthest = k;
    data_end_ = std::max(data_end_, t.offset + t.size);
    padded_end = std::max(padded_end, align64(t.offset + t.size));
  }
  // Footer (optional, spec 11.3): the last 4 bytes after the padded data, or right after the
  // unpadded data.
  has_footer_ = fsize >= padded_end + 4 || fsize == data_end_ + 4;
  if (has_footer_) file_->read_exact(fsize - 4, &stored_footer_, 4, "the footer CRC");
}

uint32_t AprFile::compute_footer_crc() const {
  // Double-buffered: a helper thread preads chunk k+1 while this one CRCs chunk k, so the
  // throughput is that of the slower of the two, not their sum.
  const uint64_t total = file_->size() - 4;
  if (file_->eager()) return crc32_update(0, file_->data(), static_cast<size_t>(total));
  const size_t chunk = static_cast<size_t>(std::min<uint64_t>(total, 8u << 20));
  std::vector<uint8_t> bufs[2] = {std::vector<uint8_t>(chunk), std::vector<uint8_t>(chunk)};
  auto read = [this, total, chunk](std::vector<uint8_t>* buf, uint64_t off) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, total - off));
    file_->read_exact(off, buf->data(), n, "the file for the footer CRC");
    return n;
  };
  uint32_t crc = 0;
  if (total == 0) return crc;
  std::future<size_t> next = std::async(std::launch::async, read, &bufs[0], 0);
  for (uint64_t off = 0, k = 0; off < total; ++k) {
    size_t n = next.get();
    if (off + n < total) next = std::async(std::launch::async, read, &bufs[(k + 1) & 1], off + n);
    crc = crc32_update(crc, bufs[k & 1].data(), n);
    off += n;
  }
  return crc;
}

void AprFile::verify_footer() const {
  const std::string& path = file_->path();
  if (!has_footer_)
    throw FormatError(path + ": verify=True but the file has no footer CRC (the " +
                      std::to_string(file_->size()) + "-byte file ends where the tensor data ends)");
  uint32_t crc = compute_footer_crc();
  if (crc != stored_footer_)
    throw FormatError(path + ": footer CRC mismatch: stored " + hex(stored_footer_) + ", computed " +
                      hex(crc) + " over bytes [0, " + std::to_string(file_->size() - 4) + ")");
}

}  // namespace apr
