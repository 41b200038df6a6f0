#!/usr/bin/env bash
# Bounded fuzzing of the native reader (about 2 minutes), from the repository root, inside the venv
# that .ci/run creates, after the normal install. Two targets, both seeded at run time from the real
# samples in ../shared/datasets_raw (never copied into the repository):
#
#   1. tests/fuzz/fuzz_reader.py: the Python entry points (Criteo, Avazu, delimited; gzip; error and
#      skip modes; whole, chunked, cached; 1 and 3 threads; the plain-Python reference), under
#      atheris (libFuzzer, Python coverage) when it installs, else its own seeded mutator.
#   2. tests/fuzz/fuzz_native.cpp: the C++ entry points (text reader, Arrow batch parser), libFuzzer
#      with ASan + UBSan, when clang++ with -fsanitize=fuzzer is available (apt-get install clang).
#      Without it this part is skipped with a notice, or fails when MLFAST_FUZZ_REQUIRE_NATIVE=1.
#
# Exits non-zero when either target finds a crash, a hang, a sanitizer report or an oracle failure.
# Longer runs: MLFAST_FUZZ_PY_SECONDS / MLFAST_FUZZ_NATIVE_SECONDS (see /work/notes/reader.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_SECONDS=${MLFAST_FUZZ_PY_SECONDS:-45}
NATIVE_SECONDS=${MLFAST_FUZZ_NATIVE_SECONDS:-45}
OUT=build/fuzz
mkdir -p "$OUT"

echo "== fuzz_reader.py (Python entry points), ${PY_SECONDS}s"
# Each run logs to a file and its own exit status decides (a pipe into grep / tail would hide it).
set +e
if python -c "import atheris" 2>/dev/null || python -m pip install -q atheris >/dev/null 2>&1; then
  python tests/fuzz/fuzz_reader.py --engine atheris --seconds "$PY_SECONDS" --corpus "$OUT/corpus_py" \
    -artifact_prefix="$OUT/" > "$OUT/fuzz_reader.log" 2>&1
  status=$?
else
  echo "atheris unavailable: the seeded random engine instead"
  python tests/fuzz/fuzz_reader.py --engine random --seconds "$PY_SECONDS" --seed "${MLFAST_FUZZ_SEED:-$RANDOM}" \
    > "$OUT/fuzz_reader.log" 2>&1
  status=$?
fi
set -e
grep -v "^INFO: Instrumenting" "$OUT/fuzz_reader.log" | tail -n 8
[ "$status" -eq 0 ] || { echo "fuzz_reader.py FAILED (exit $status; log: $OUT/fuzz_reader.log)"; exit 1; }

echo "== fuzz_native.cpp (C++ entry points, libFuzzer + ASan + UBSan), ${NATIVE_SECONDS}s"
CLANG=""
for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
  if command -v "$c" >/dev/null && echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) {return 0;}' |
      "$c" -x c++ -fsanitize=fuzzer - -o "$OUT/probe" 2>/dev/null; then
    CLANG=$c
    break
  fi
done
if [ -z "$CLANG" ]; then
  echo "SKIPPED: no clang++ with -fsanitize=fuzzer (apt-get install clang)"
  [ "${MLFAST_FUZZ_REQUIRE_NATIVE:-0}" = 1 ] && exit 1
  exit 0
fi
"$CLANG" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Icsrc \
  tests/fuzz/fuzz_native.cpp csrc/reader.cpp csrc/arrow_batch.cpp csrc/hash_rows.cpp csrc/checksum.cpp \
  -lz -lpthread -o "$OUT/fuzz_native"
mkdir -p "$OUT/corpus_native"
python tests/fuzz/fuzz_reader.py --write-native-seeds "$OUT/corpus_native"
set +e
ASAN_OPTIONS=detect_leaks=1 "$OUT/fuzz_native" "$OUT/corpus_native" -max_total_time="$NATIVE_SECONDS" \
  -max_len=8192 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$OUT/" \
  > "$OUT/fuzz_native.log" 2>&1
status=$?
set -e
grep -E "^(stat::|INFO: seed|Done|==|SUMMARY|.*ERROR)" "$OUT/fuzz_native.log" || true
[ "$status" -eq 0 ] || { echo "fuzz_native FAILED (exit $status; log: $OUT/fuzz_native.log, input in $OUT/)"; exit 1; }
echo "fuzz: OK"
