#!/usr/bin/env bash
# The native reader under AddressSanitizer + UndefinedBehaviorSanitizer, from the repository root,
# inside the venv that .ci/run creates, after the normal install (a few minutes):
#
#   1. builds the package with csrc/ compiled -fsanitize=address,undefined into its own directory,
#      build/asan/site (pip install --target; the normal editable build is left alone);
#   2. runs the reader, cache, hashing and Parquet tests and a bounded fuzz run (the seeded
#      mutator of tests/fuzz/fuzz_reader.py, which checks every input against its oracle) with
#      that build imported in place of the normal one, libasan and libstdc++ preloaded;
#   3. exits non-zero on any sanitizer report (each one also aborts its process: halt_on_error,
#      -fno-sanitize-recover=all) or any test / oracle failure.
#
# ASAN_OPTIONS keeps detect_leaks=0: the interpreter and numpy keep allocations alive until exit,
# which LeakSanitizer reports; the libFuzzer run of .ci/fuzz.sh checks the C++ code for leaks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=build/asan
SITE=$ROOT/site
REPORTS=$ROOT/reports
FUZZ_SECONDS=${MLFAST_SANITIZE_FUZZ_SECONDS:-40}
FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
rm -rf "$SITE" "$REPORTS"
mkdir -p "$REPORTS"

echo "== building csrc/ with $FLAGS into $SITE"
# --no-build-isolation needs the build backend (pyproject's build-system.requires) in this venv:
# `pip install -e .` put it only into an isolated build environment that is gone.
build_requires=$(python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))")
# shellcheck disable=SC2086
python -m pip install -q $build_requires
python -m pip install -q --no-deps --no-build-isolation --target "$SITE" \
  -C build-dir="$ROOT/cmake" -C cmake.build-type=RelWithDebInfo \
  -C cmake.define.CMAKE_CXX_FLAGS="$FLAGS" -C cmake.define.CMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" .
# Import mlfast from the sanitized copy: neither the editable install's hook nor the repository's
# own mlfast/ (the working directory comes first on sys.path) may serve it in this run.
cat > "$SITE/sitecustomize.py" <<'EOF'
import importlib.machinery
import os
import sys

SITE = os.path.dirname(os.path.abspath(__file__))


class SanitizedMlfast:
    @staticmethod
    def find_spec(name, path=None, target=None):
        return importlib.machinery.PathFinder.find_spec(name, [SITE]) if name == "mlfast" else None


sys.meta_path[:] = [SanitizedMlfast] + [f for f in sys.meta_path
                                        if not type(f).__module__.startswith("_editable_skbc_")]
EOF

export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$PWD/$REPORTS/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$PWD/$REPORTS/ubsan"
export MLFAST_CACHE_DIR="$PWD/$ROOT/cache"

where=$(python -c "import mlfast._native as n; print(n.__file__)")
case "$where" in
  "$PWD/$SITE"/*) echo "sanitized extension: $where" ;;
  *) echo "FAILED: the tests would import $where, not the sanitized build"; exit 1 ;;
esac

# The checks can fail: the extension is instrumented, and a known overflow is caught and reported.
nm -D "$where" | grep -q __asan_report_load || { echo "FAILED: $where has no ASan instrumentation"; exit 1; }
nm -D "$where" | grep -q __ubsan_handle || { echo "FAILED: $where has no UBSan instrumentation"; exit 1; }
if (python -c "import ctypes; a = ctypes.create_string_buffer(1 << 20); b = ctypes.create_string_buffer(2 << 20)
ctypes.memmove(b, a, (1 << 20) + 64)") 2>/dev/null || [ -z "$(find "$REPORTS" -type f)" ]; then
  echo "FAILED: a deliberate heap overflow went unreported: the sanitizer is not active"
  exit 1
fi
rm -f "$REPORTS"/*
echo "self-check: a deliberate heap-buffer-overflow was caught and reported"

status=0
echo "== tests under the sanitizers"
python -m pytest -q -p no:cacheprovider tests/test_reader_criteo.py tests/test_reader_avazu.py \
  tests/test_reader_delimited.py tests/test_reader_quoted.py tests/test_reader_native_bags.py \
  tests/test_reader_bad_input.py tests/test_reader_faults.py tests/test_cache.py tests/test_hashing.py \
  tests/test_parquet.py -k "not cli_trains" || status=1

echo "== fuzz_reader.py (random engine) under the sanitizers, ${FUZZ_SECONDS}s"
python tests/fuzz/fuzz_reader.py --engine random --seconds "$FUZZ_SECONDS" --seed "${MLFAST_FUZZ_SEED:-$RANDOM}" \
  || status=1

reports=$(find "$REPORTS" -type f | wc -l)
if [ "$reports" -gt 0 ]; then
  echo "FAILED: $reports sanitizer report(s):"
  for f in "$REPORTS"/*; do echo "--- $f"; head -n 40 "$f"; done
  exit 1
fi
[ "$status" -eq 0 ] || { echo "FAILED: a test or the fuzz oracle failed under the sanitizers"; exit 1; }
echo "sanitize: OK (0 sanitizer reports)"
