// Placeholder binding (replaced by the loader work of issue 2).
#include <nanobind/nanobind.h>
namespace nb = nanobind;
NB_MODULE(_apr_ext, m) { m.attr("FORMAT_VERSION") = nb::make_tuple(2, 0); }
