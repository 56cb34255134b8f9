// APR v2 header and tensor-index parsing and validation (spec section 16, the reader checklist).
//
// Everything is read with pread and checked before any tensor byte is touched: the header, its CRC,
// the flags, every offset and size (overflow-safe), dtype x shape == size, overlaps and duplicates.
// Limits keep a small hostile file from making the parser allocate much or loop for long: the
// memory it allocates is bounded by the file size and by the limits below.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mapped_file.hpp"

namespace apr {

enum class DType : uint8_t { F32, F16, BF16, F64, I32, I64, I8, U8, Q4_K, Q6_K, APR_Q4, APR_Q8 };

const char* dtype_name(DType d) noexcept;

namespace limits {
constexpr uint64_t kMaxTensors = 1u << 20;            // 1,048,576 index entries
constexpr unsigned kMaxNdim = 8;                       // spec: ndim <= 8
constexpr unsigned kMaxNameLen = 256;                  // spec: names <= 256 bytes
constexpr uint64_t kMaxMetadata = 256ull << 20;        // 256 MiB of JSON (a big vocab is ~10 MiB)
constexpr uint64_t kMaxEntryBytes = 2 + kMaxNameLen + 2 + 8 * kMaxNdim + 16;
}  // namespace limits

namespace flags {
constexpr uint16_t kLz4 = 0x0001, kZstd = 0x0002, kEncrypted = 0x0004, kSigned = 0x0008;
constexpr uint16_t kRowMajor = 0x0400, kColumnMajor = 0x0800;
}  // namespace flags

struct TensorEntry {
  std::string name;
  DType dtype;
  uint8_t code;                 // the stored dtype byte (8/9 are legacy APR_Q4/APR_Q8)
  std::vector<uint64_t> shape;
  uint64_t offset;              // absolute file offset (data_offset + entry offset)
  uint64_t size;                // stored bytes
  bool placeholder;             // size 0 where dtype x shape says more (tied lm_head, spec 10.4)
};

struct Header {
  char magic[4];
  uint8_t version_major, version_minor;
  uint16_t flags;
  uint32_t tensor_count;
  uint64_t metadata_offset;
  uint32_t metadata_size;
  uint64_t tensor_index_offset;
  uint64_t data_offset;
  uint32_t checksum;
};

class AprFile {
 public:
  // Opens, validates, then maps (or, eager, reads) the file. Throws FormatError / OsError.
  explicit AprFile(const std::string& path, bool eager = false);
  ~AprFile() { file_->close_fd(); }  // the mapping may outlive us (tensors); the descriptor does not
  AprFile(const AprFile&) = delete;
  AprFile& operator=(const AprFile&) = delete;

  const std::shared_ptr<MappedFile>& mapping() const { return file_; }
  const Header& header() const { return header_; }
  const std::string& metadata() const { return metadata_; }
  const std::vector<TensorEntry>& tensors() const { return tensors_; }
  bool index_sorted() const { return sorted_; }
  bool header_crc_present() const { return header_.checksum != 0 || header_crc_matches_; }
  bool has_footer() const { return has_footer_; }
  uint32_t stored_footer_crc() const { return stored_footer_; }
  uint64_t data_end() const { return data_end_; }  // end of the last tensor's bytes

  // CRC-32 of bytes [0, file_size - 4): read with pread (no SIGBUS if the file shrank), or from
  // memory when the file was read eagerly.
  uint32_t compute_footer_crc() const;
  // Throws FormatError when the footer is missing or does not match.
  void verify_footer() const;

 private:
  void parse_header();
  void parse_index();
  void check_layout();

  std::shared_ptr<MappedFile> file_;
  Header header_{};
  bool header_crc_matches_ = false;
  std::string metadata_;
  std::vector<TensorEntry> tensors_;
  bool sorted_ = true;
  bool has_footer_ = false;
  uint32_t stored_footer_ = 0;
  uint64_t data_end_ = 0;
};

// Byte sizes a (dtype, shape) pair needs, or false on overflow.
bool expected_nbytes(DType d, const std::vector<uint64_t>& shape, uint64_t* out) noexcept;

}  // namespace apr
