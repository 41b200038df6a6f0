#!/usr/bin/env bash
# The one GPU-session script: build, GPU tests, benchmarks, results JSON, in one call of a few
# minutes. From the repository root on the device machine (device tool):
#
#   bash bench/device_run.sh                 # writes $OUT/{log.txt,results.json,...}
#   bash bench/device_run.sh --dry-run       # on a CPU: same stages, tiny sizes, Triton interpreter
#
# Stage limits add up to under 600 s (one device call; the session has 15 minutes in all).
# bench/collect_results.py exits non-zero on any failed stage or missed bar; the script's own exit
# status is that of the collect stage.
# Each stage has its own time limit and a failing stage does not stop the others (the log says
# which failed). The merged results (GPU name, versions, config, rows) are written to
# $OUT/results.json and bench/results/<gpu>.json; commit the latter.
# Missing pure-Python test/plot packages are installed from ./.wheels when present
# (bash bench/fetch_device_wheels.sh before the session, then carry .wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mlfast_device_out}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
LOG="$OUT/log.txt"
: > "$LOG"
log() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    log "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/.stage.txt" 2>&1
    local rc=$?
    cat "$OUT/.stage.txt" >> "$LOG"
    tail -n 30 "$OUT/.stage.txt"
    log "== $name rc=$rc in $((SECONDS - t0))s"
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT/stages.jsonl"
    return $rc
}
: > "$OUT/stages.jsonl"

if [ $DRY = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    export MLFAST_CACHE_DIR="$OUT/cache"
    TESTS=(tests/test_engine.py tests/test_tables.py tests/test_kernel_mutual_loss.py)
    RESULTS="$OUT/results_dir"  # a dry run leaves bench/results alone
    BENCH_STEP="--device cpu --impls eager,compile,sparse,mlfast,mlp --rows 20000 --batch-sizes 256 --steps 3 --warmup 1"
else
    export MLFAST_CACHE_DIR="$OUT/cache"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
    if [ -d .wheels ]; then
        for mod in pytest pytest_benchmark tqdm matplotlib; do
            python -c "import $mod" 2>/dev/null || pip install -q --no-index --find-links .wheels "${mod//_/-}" >> "$LOG" 2>&1
        done
    fi
    stage install 60 pip install --no-build-isolation --no-deps -e .
    TESTS=(tests/test_kernel_mutual_loss.py tests/test_kernel_embedding.py tests/test_kernel_sparse_update.py
           tests/test_tables.py tests/test_engine.py tests/test_engine_cuda.py tests/test_models.py tests/test_cross.py)
    RESULTS=bench/results
    # every implementation (compile included) at every workload, in one process: the ratios are same-run
    BENCH_STEP="--device cuda --impls eager,compile,sparse,mlfast,mlp --steps 20 --warmup 3"
fi
python - <<'PY' | tee -a "$LOG"
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError: print("triton missing")
PY

# 1. correctness on the GPU: kernels compiled for it, the fused/graphed step, AUC parity
stage gpu_tests 120 python -m pytest -q -p no:cacheprovider "${TESTS[@]}"
# 2. kernels: fused loss vs eager; embedding forward / backward+optimizer GB/s vs device copy
if [ $DRY = 0 ]; then
    stage bench_loss 45 python bench/test_bench_mutual_loss.py --kinds kl,symkl,mse --json "$OUT/loss.json"
    stage bench_embedding 75 python bench/test_bench_embedding.py --json "$OUT/embedding.json"
fi
# 3. the training step: every implementation at every workload, one process (rows written as measured)
stage bench_step 240 python -m mlfast.cli bench $BENCH_STEP --json "$OUT/step.json"
stage collect 20 python bench/collect_results.py "$OUT" "$RESULTS"
rc=$?
rm -f "$OUT/.stage.txt"
log "done (collect rc=$rc: non-zero when a stage failed or a bar was missed); results in $OUT/results.json"
exit $rc
