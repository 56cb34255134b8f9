// The two exception types of the core. bindings.cpp maps them onto Python exceptions:
// FormatError -> apr_kernels.errors.AprFormatError (a ValueError), OsError -> OSError with errno.
#pragma once

#include <stdexcept>
#include <string>

namespace apr {

// The file is not a valid APR v2 file. The message names the file, the field or tensor at fault,
// and what was expected.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A system call failed (open, fstat, mmap, pread).
struct OsError : std::runtime_error {
  OsError(int err, const std::string& path, const std::string& what)
      : std::runtime_error(what), errno_value(err), filename(path) {}
  int errno_value;
  std::string filename;
};

}  // namespace apr
