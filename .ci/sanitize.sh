#!/usr/bin/env bash
# The C++ kernel tests on an AddressSanitizer + UndefinedBehaviorSanitizer build of the
# extension, so that an out-of-bounds read in a SIMD tail, a misaligned access or an integer
# overflow fails CI instead of shipping.
#
#   bash .ci/sanitize.sh            (in an environment where pycnn is installed: .ci/run's venv)
#
# Builds CMakeLists.txt with -DPYCNN_SANITIZE=ON (-O1 -g: the hand-written SIMD code is all
# there, the build takes ~3 min on 2 cores) into build/sanitize (beside, not over, the
# normal install), then runs the C++ tests with PYCNN_EXTENSION_DIR pointing there and the
# ASan runtime preloaded into Python (which is not built with ASan).  Both variants are built;
# the one this CPU chooses runs every C++ test, the baseline (PYCNN_CPU=baseline) the kernel
# tests.  Leak detection is off (CPython does not free everything at exit, by design).  Fails
# on any sanitizer report (each is also written to build/sanitize/reports/).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
BUILD=build/sanitize
CXX=${CXX:-c++}

# cmake / ninja / pybind11 for a build outside pip (from PyPI where the machine has none)
need=(pybind11)
command -v cmake >/dev/null || need+=(cmake)
command -v ninja >/dev/null || need+=(ninja)
"$PY" -m pip install --quiet "${need[@]}"

asan=$("$CXX" -print-file-name=libasan.so)
stdcxx=$("$CXX" -print-file-name=libstdc++.so.6)
for lib in "$asan" "$stdcxx"; do
    if [[ "$lib" != /* || ! -e "$lib" ]]; then
        echo "sanitize: the compiler has no $(basename "$lib") to preload: $lib" >&2
        exit 1
    fi
done
# The ASan runtime first; libstdc++ loaded with it, so that ASan's __cxa_throw interceptor
# finds the real one at start (Python does not link libstdc++: without it the first C++
# exception aborts with "CHECK failed: ... real___cxa_throw != 0").
preload="$asan $stdcxx"

# Canaries: the toolchain must catch what this step is for, an out-of-bounds vector load (the
# tail of a SIMD loop) and a misaligned float load; sanitizers that report neither fail here.
mkdir -p "$BUILD/canary"
cat >"$BUILD/canary/canary.cpp" <<'CANARY'
#include <cstdio>
#include <cstring>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
int main(int argc, char** argv) {
    std::vector<float> v(12, 1.0f);
    float out = 0.0f;
    if (argc > 1 && std::strcmp(argv[1], "tail") == 0) {  // 8 floats from index 8: 4 past the end
#if defined(__AVX2__)
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_loadu_ps(v.data() + 8));
        out = lanes[3];
#else
        for (int i = 8; i < 16; ++i) out += v.data()[i];
#endif
    } else {  // a float at an odd address
        alignas(8) unsigned char bytes[16] = {};
        out = *reinterpret_cast<const float*>(bytes + 1 + argc % 2);
    }
    std::printf("%f\n", out);
    return 0;
}
CANARY
canary_flags=(-O2 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
if [[ "$(uname -m)" == x86_64 ]]; then canary_flags+=(-mavx2); fi
"$CXX" "${canary_flags[@]}" "$BUILD/canary/canary.cpp" -o "$BUILD/canary/canary"
for case in tail misaligned; do
    if ASAN_OPTIONS=detect_leaks=0 "$BUILD/canary/canary" "$case" >"$BUILD/canary/$case.log" 2>&1 \
        || ! grep -qE "ERROR: AddressSanitizer|runtime error: load of misaligned address" "$BUILD/canary/$case.log"; then
        echo "sanitize: the sanitizers missed the $case canary:" >&2
        cat "$BUILD/canary/$case.log" >&2
        exit 1
    fi
done
echo "== sanitize: canaries caught (an out-of-bounds vector load, a misaligned load)"

echo "== sanitize: build ($BUILD)"
start=$SECONDS
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$CXX" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DPYCNN_SANITIZE=ON \
    -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    >"$BUILD/configure.log" 2>&1 || { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD"
echo "== sanitize: built in $((SECONDS - start)) s"
for so in "$BUILD"/_C_*.so; do
    symbols=$(nm -D "$so")  # (not `nm | grep -q`: grep's early exit fails the pipe under pipefail)
    [[ $symbols == *__asan_init* && $symbols == *__ubsan_handle* ]] || { echo "sanitize: $so is not instrumented" >&2; exit 1; }
done

reports="$BUILD/reports"
rm -rf "$reports" && mkdir -p "$reports"
export PYCNN_EXTENSION_DIR="$PWD/$BUILD"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$PWD/$reports/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$PWD/$reports/ubsan"
export NUMBA_ENABLE_CUDASIM=1

check_loaded() {  # the sanitized binary is what runs
    LD_PRELOAD="$preload" "$PY" - "$@" <<'EOF'
import sys
import pycnn._C as C, pycnn._cpu as cpu
info = cpu.cpu_info()
assert info["build"]["sanitize"] is True and info["file"].startswith(sys.argv[1]), info
print(f"sanitize: running {info['module']} from {info['file']} ({info['reason']})")
EOF
}

run_tests() {  # pytest under the ASan runtime; fails on a report even where a test swallowed it
    start=$SECONDS
    status=0
    LD_PRELOAD="$preload" "$PY" -m pytest -q -p no:cacheprovider "$@" || status=$?
    echo "== sanitize: $((SECONDS - start)) s"
    if compgen -G "$reports/*" >/dev/null; then
        echo "sanitize: sanitizer reports:" >&2
        cat "$reports"/* >&2
        exit 1
    fi
    [[ $status -eq 0 ]] || exit $status
}

echo "== sanitize: the C++ tests on the variant this CPU chooses"
check_loaded "$PWD/$BUILD"
run_tests tests/test_cpp_*.py tests/test_regressions.py tests/test_properties.py tests/test_conv_act.py

echo "== sanitize: the kernel tests on the baseline variant (PYCNN_CPU=baseline)"
export PYCNN_CPU=baseline
check_loaded "$PWD/$BUILD"
run_tests tests/test_cpp_conv.py tests/test_cpp_maps.py tests/test_cpp_batchnorm.py tests/test_conv_act.py
echo "== sanitize: no reports"
