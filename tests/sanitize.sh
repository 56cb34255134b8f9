#!/usr/bin/env bash
# The C++ loader under AddressSanitizer + UndefinedBehaviorSanitizer (by hand; CI runs the plain build):
# builds csrc/ instrumented into build/asan, puts it beside a copy of the package there (ahead of the
# installed one on PYTHONPATH), then runs the loader, format-error and golden tests and the fuzz loop.
# Any out-of-bounds read, use after free or undefined behaviour in the extension aborts with a report
# (pytest captures at the sys level only, so the report reaches the terminal).
#
#   bash tests/sanitize.sh                         # FUZZ_ITERATIONS=20000 by default
#   bash tests/sanitize.sh tests/test_convert_gguf.py   # more test files (pytest arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/asan
if ! python3 -c "import nanobind" 2>/dev/null || ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  echo "sanitize.sh: needs nanobind, cmake and ninja for $(command -v python3) (pip install nanobind cmake ninja)" >&2
  exit 2
fi
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -O1 -g"
cmake -S . -B "$build" -G Ninja -DSKBUILD=ON -DCMAKE_BUILD_TYPE=Debug -DPython_EXECUTABLE="$(command -v python3)" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build "$build" >/dev/null
rm -rf "$build/pkg" && mkdir -p "$build/pkg"
cp -r python/apr_kernels "$build/pkg/" && cp -r kernels "$build/pkg/apr_kernels/kernels"
cp "$build"/_apr_ext*.so "$build/pkg/apr_kernels/"
# an editable install's import redirect would still win over PYTHONPATH: dropped at startup
cat > "$build/pkg/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
PY

export PYTHONPATH="$PWD/$build/pkg" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# the sanitizer runtimes first in the process (python itself is not instrumented)
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
python3 - <<'PY'
import apr_kernels._apr_ext as ext
assert "build/asan" in ext.__file__, f"the instrumented extension is not the one imported: {ext.__file__}"
PY
python3 -m pytest -q -p no:cacheprovider --capture=sys tests/test_format_errors.py tests/test_io.py tests/test_golden.py "$@"
python3 tests/fuzz_apr.py --iterations "${FUZZ_ITERATIONS:-20000}" --seed 7
