// NB_MODULE(_apr_ext): the Python face of the C++ core. No torch or CUDA at build time: tensors
// leave as DLPack (nanobind imports torch lazily when it converts).
//
// Ownership: one MappedFile per open file, held by a shared_ptr. The Reader holds one reference;
// every exported buffer holds another through its capsule owner, so the mapping lives until the
// Reader is closed AND the last tensor viewing it is gone.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cerrno>
#include <memory>

#include "apr_file.hpp"
#include "crc32.hpp"
#include "errors.hpp"

namespace nb = nanobind;
using namespace nb::literals;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "APR v2 is little-endian; big-endian hosts are not supported");

namespace {

bool plain_dtype(apr::DType d, nb::dlpack::dtype* out) {
  using nb::dlpack::dtype_code;
  auto mk = [&](dtype_code c, int bits) { *out = {static_cast<uint8_t>(c), static_cast<uint8_t>(bits), 1}; return true; };
  switch (d) {
    case apr::DType::F32: return mk(dtype_code::Float, 32);
    case apr::DType::F16: return mk(dtype_code::Float, 16);
    case apr::DType::BF16: return mk(dtype_code::Bfloat, 16);
    case apr::DType::F64: return mk(dtype_code::Float, 64);
    case apr::DType::I32: return mk(dtype_code::Int, 32);
    case apr::DType::I64: return mk(dtype_code::Int, 64);
    case apr::DType::I8: return mk(dtype_code::Int, 8);
    case apr::DType::U8: return mk(dtype_code::UInt, 8);
    default: return false;
  }
}

using ByteTensor = nb::ndarray<nb::pytorch, uint8_t, nb::ndim<1>, nb::c_contig>;

class Reader {
 public:
  Reader(const std::string& path, bool eager) : file_(std::make_shared<apr::AprFile>(path, eager)) {}

  // For work done without the GIL: the copy keeps the AprFile (and its descriptor) alive even if
  // another thread closes the Reader meanwhile.
  std::shared_ptr<const apr::AprFile> shared() const {
    f();
    return file_;
  }

  const apr::AprFile& f() const {
    if (!file_) throw apr::FormatError(path_closed_ + ": the APR file is closed");
    return *file_;
  }

  // A uint8 tensor over bytes [offset, offset + size) of the mapping.
  ByteTensor view(uint64_t offset, uint64_t size) const {
    const auto& mf = f().mapping();
    if (offset > mf->size() || size > mf->size() - offset)
      throw apr::FormatError(mf->path() + ": byte range [" + std::to_string(offset) + ", +" +
                             std::to_string(size) + ") is outside the mapping");
    auto* holder = new std::shared_ptr<apr::MappedFile>(mf);
    nb::capsule owner(holder, [](void* p) noexcept { delete static_cast<std::shared_ptr<apr::MappedFile>*>(p); });
    size_t shape[1] = {static_cast<size_t>(size)};
    return ByteTensor(mf->data() + offset, 1, shape, owner);
  }

  // Tensor i as a typed, shaped zero-copy tensor for the plain dtypes when its address is aligned
  // to the element size; otherwise (block formats, misaligned data, placeholders) the raw bytes.
  nb::ndarray<nb::pytorch> tensor(size_t i) const {
    const apr::AprFile& af = f();
    if (i >= af.tensors().size()) throw nb::index_error("tensor index out of range");
    const apr::TensorEntry& t = af.tensors()[i];
    const auto& mf = af.mapping();
    auto* holder = new std::shared_ptr<apr::MappedFile>(mf);
    nb::capsule owner(holder, [](void* p) noexcept { delete static_cast<std::shared_ptr<apr::MappedFile>*>(p); });
    nb::dlpack::dtype dt;
    if (!t.placeholder && plain_dtype(t.dtype, &dt) && t.offset % (dt.bits / 8) == 0) {
      size_t shape[apr::limits::kMaxNdim];
      for (size_t d = 0; d < t.shape.size(); ++d) shape[d] = static_cast<size_t>(t.shape[d]);
      return nb::ndarray<nb::pytorch>(mf->data() + t.offset, t.shape.size(), shape, owner, nullptr, dt);
    }
    size_t shape[1] = {static_cast<size_t>(t.size)};
    return nb::ndarray<nb::pytorch>(mf->data() + t.offset, 1, shape, owner, nullptr, nb::dtype<uint8_t>());
  }

  nb::list tensors() const {
    nb::list out;
    for (size_t i = 0; i < f().tensors().size(); ++i) out.append(tensor(i));
    return out;
  }

  nb::list entries() const {
    nb::list out;
    for (const auto& t : f().tensors()) {
      nb::list shape;
      for (uint64_t d : t.shape) shape.append(d);
      out.append(nb::make_tuple(nb::str(t.name.data(), t.name.size()), apr::dtype_name(t.dtype),
                                nb::tuple(shape), t.offset, t.size, t.placeholder, t.code));
    }
    return out;
  }

  // Drops this handle's reference; the descriptor closes with the AprFile, the mapping with the
  // last tensor viewing it.
  void close() {
    if (file_) {
      path_closed_ = file_->mapping()->path();
      file_.reset();
    }
  }

  bool closed() const { return !file_; }

 private:
  std::shared_ptr<apr::AprFile> file_;
  std::string path_closed_;
};

}  // namespace

NB_MODULE(_apr_ext, m) {
  m.doc() = "C++ core of apr_kernels: APR v2 mapping, validation, zero-copy views and CRC-32";
  m.attr("FORMAT_VERSION") = nb::make_tuple(2, 0);

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const apr::FormatError& e) {
      // Raise the package's own exception type (a ValueError subclass) directly.
      nb::object cls = nb::module_::import_("apr_kernels.errors").attr("AprFormatError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const apr::OsError& e) {
      errno = e.errno_value;
      PyErr_SetFromErrnoWithFilename(PyExc_OSError, e.filename.c_str());
    }
  });

  nb::dict lim;
  lim["max_tensors"] = apr::limits::kMaxTensors;
  lim["max_ndim"] = apr::limits::kMaxNdim;
  lim["max_name_len"] = apr::limits::kMaxNameLen;
  lim["max_metadata"] = apr::limits::kMaxMetadata;
  m.attr("LIMITS") = lim;

  nb::class_<Reader>(m, "Reader")
      .def(nb::init<const std::string&, bool>(), "path"_a, "eager"_a = false, nb::call_guard<nb::gil_scoped_release>(),
           "Open and validate an APR v2 file, then map it (eager: read it into private memory); "
           "raises AprFormatError / OSError.")
      .def_prop_ro("eager", [](const Reader& r) { return r.f().mapping()->eager(); })
      .def_prop_ro("path", [](const Reader& r) { return r.f().mapping()->path(); })
      .def_prop_ro("file_size", [](const Reader& r) { return r.f().mapping()->size(); })
      .def_prop_ro("magic", [](const Reader& r) { return nb::bytes(r.f().header().magic, 4); })
      .def_prop_ro("version", [](const Reader& r) {
        return nb::make_tuple(r.f().header().version_major, r.f().header().version_minor);
      })
      .def_prop_ro("flags", [](const Reader& r) { return r.f().header().flags; })
      .def_prop_ro("data_offset", [](const Reader& r) { return r.f().header().data_offset; })
      .def_prop_ro("data_end", [](const Reader& r) { return r.f().data_end(); })
      .def_prop_ro("index_sorted", [](const Reader& r) { return r.f().index_sorted(); })
      .def_prop_ro("header_crc_present", [](const Reader& r) { return r.f().header_crc_present(); })
      .def_prop_ro("has_footer", [](const Reader& r) { return r.f().has_footer(); })
      .def_prop_ro("footer_crc", [](const Reader& r) { return r.f().stored_footer_crc(); })
      .def_prop_ro("identity", [](const Reader& r) {
        return nb::make_tuple(r.f().mapping()->device(), r.f().mapping()->inode());
      }, "(st_dev, st_ino) of the mapped file")
      .def_prop_ro("closed", &Reader::closed)
      .def("metadata_bytes", [](const Reader& r) {
        const std::string& s = r.f().metadata();
        return nb::bytes(s.data(), s.size());
      })
      .def("entries", &Reader::entries,
           "[(name, dtype, shape, absolute offset, size, placeholder, dtype code)] in index order")
      .def("tensor", &Reader::tensor, "i"_a,
           "Tensor i (index order): typed zero-copy view for aligned plain dtypes, else raw uint8")
      .def("tensors", &Reader::tensors, "All tensors as by tensor(i), in index order")
      .def("view", &Reader::view, "offset"_a, "size"_a,
           "uint8 tensor over mapping bytes [offset, offset+size); keeps the mapping alive")
      .def("current_size", [](const Reader& r) { return r.f().mapping()->current_size(); })
      .def("compute_footer_crc", [](const Reader& r) {
        auto f = r.shared();
        nb::gil_scoped_release nogil;
        return f->compute_footer_crc();
      })
      .def("verify", [](const Reader& r) {
        auto f = r.shared();
        nb::gil_scoped_release nogil;
        f->verify_footer();
      }, "Check the footer CRC over the whole file (AprFormatError if missing or wrong)")
      .def("close", &Reader::close);

  using Bytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
  m.def("crc32", [](Bytes data, uint32_t value) {
    const uint8_t* p = data.data();
    size_t n = data.shape(0);
    nb::gil_scoped_release nogil;
    return apr::crc32_update(value, p, n);
  }, "data"_a, "value"_a = 0, "CRC-32 like zlib.crc32(data, value), for 1-D uint8 buffers");
  m.def("crc32_slice8", [](Bytes data, uint32_t value) {
    return apr::crc32_slice8(value, data.data(), data.shape(0));
  }, "data"_a, "value"_a = 0, "The portable slice-by-8 path (for tests)");
  m.def("crc32_impl", &apr::crc32_impl, "Which CRC-32 path this CPU uses");
}
