// RAII file mapping: MAP_PRIVATE with PROT_READ|PROT_WRITE (copy-on-write), so tensors handed to
// torch (which ignores DLPack read-only flags) can be written in place without touching the file
// or faulting. The descriptor stays open while the object lives, for pread-based parsing and for
// the size/identity checks; the mapping itself is released when the last owner goes.
//
// Eager mode reads the whole file into private anonymous memory instead, with large preads from
// several threads: on network filesystems (NFS, Lustre) a mapping faults in 4 KiB at a time, and
// eager memory never SIGBUSes if the file is truncated afterwards. Tensors are views either way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace apr {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // opens and sizes; throws OsError / FormatError
  ~MappedFile();

  // Maps the file, or (eager) reads it whole into private memory. Called once, after validation.
  void load(bool eager);
  bool eager() const { return eager_; }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }  // file size at open
  uint8_t* data() const { return data_; }  // nullptr for an empty file or before load()
  uint64_t device() const { return dev_; }
  uint64_t inode() const { return ino_; }

  // Reads exactly n bytes at offset with pread (not through the mapping, so a file that shrank
  // gives a clean error instead of SIGBUS). Throws FormatError on a short read naming `what`.
  void read_exact(uint64_t offset, void* dst, size_t n, const char* what) const;

  // Current size of the file on disk (fstat), to detect truncation after open.
  uint64_t current_size() const;

  // Drops the descriptor (the mapping stays valid). Idempotent.
  void close_fd() noexcept;

 private:
  std::string path_;
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  bool eager_ = false;
  uint64_t dev_ = 0, ino_ = 0;
};

}  // namespace apr
