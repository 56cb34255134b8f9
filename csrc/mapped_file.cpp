#include "mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <future>
#include <vector>

#include "errors.hpp"

namespace apr {

namespace {
[[noreturn]] void throw_os(int err, const std::string& path, const char* call) {
  throw OsError(err, path, std::string(call) + " failed: " + std::strerror(err));
}
constexpr uint64_t kChunk = 16u << 20;  // eager reads: bytes per pread request
}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw_os(errno, path, "open");
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    int err = errno;
    ::close(fd_);
    throw_os(err, path, "fstat");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd_);
    throw FormatError(path + ": not a regular file (expected an APR v2 model file)");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  dev_ = static_cast<uint64_t>(st.st_dev);
  ino_ = static_cast<uint64_t>(st.st_ino);
}

void MappedFile::load(bool eager) {
  if (data_ || size_ == 0) return;
  if (fd_ < 0) throw FormatError(path_ + ": file is closed (mapping it)");
  eager_ = eager;
  void* p = eager ? ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                  : ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd_, 0);
  if (p == MAP_FAILED) throw_os(errno, path_, eager ? "mmap (memory for mmap=False)" : "mmap");
  data_ = static_cast<uint8_t*>(p);
  if (!eager) return;
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
  // Stripes of 16 MiB chunks, one stripe per thread: several requests in flight is what network
  // filesystems need to reach their bandwidth; a local disk is read at its speed either way.
  const uint64_t chunks = (size_ + kChunk - 1) / kChunk;
  const unsigned threads = static_cast<unsigned>(std::min<uint64_t>(chunks, 8));
  auto stripe = [this, threads, chunks](unsigned t) {
    for (uint64_t c = t; c < chunks; c += threads)
      read_exact(c * kChunk, data_ + c * kChunk, std::min(kChunk, size_ - c * kChunk), "the file (mmap=False)");
  };
  std::vector<std::future<void>> jobs;
  for (unsigned t = 1; t < threads; ++t) jobs.push_back(std::async(std::launch::async, stripe, t));
  std::exception_ptr error;
  try {
    stripe(0);  // this thread reads stripe 0
  } catch (...) {
    error = std::current_exception();
  }
  for (auto& j : jobs) {
    try {
      j.get();
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(data_, size_);
  close_fd();
}

void MappedFile::close_fd() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void MappedFile::read_exact(uint64_t offset, void* dst, size_t n, const char* what) const {
  if (fd_ < 0) throw FormatError(path_ + ": file is closed (reading " + what + ")");
  auto* out = static_cast<uint8_t*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(fd_, out, n, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw_os(errno, path_, "pread");
    }
    if (got == 0)
      throw FormatError(path_ + ": file ended at byte " + std::to_string(offset) + " while reading " +
                        what + " (the file was truncated after it was opened?)");
    out += got;
    offset += static_cast<uint64_t>(got);
    n -= static_cast<size_t>(got);
  }
}

uint64_t MappedFile::current_size() const {
  if (fd_ < 0) return size_;
  struct stat st;
  if (::fstat(fd_, &st) != 0) throw_os(errno, path_, "fstat");
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace apr
