#!/usr/bin/env bash
# NCCL smoke test of multi-process training on a GPU machine: every --parallel mode through torchrun
# with NCCL, a world of 1 (and of every GPU when there are more), then one process evaluates each run.
# It also records the single-GPU training rate that bench/bench_dist.py's projection assumes.
#
#   bash bench/dist_smoke.sh            # results and logs under $OUT (default /tmp/mlfast_dist_smoke)
#
# Waits for a GPU: not run yet (the sessions so far had none). Needs: CUDA torch, triton, the repo
# installed (pip install -e .). Exit status: non-zero on the first failure; summary in $OUT/smoke.txt.
set -euo pipefail

OUT=${OUT:-/tmp/mlfast_dist_smoke}
mkdir -p "$OUT"
DATA="$OUT/train.tsv"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then
    echo "no CUDA device: this smoke test needs a GPU" | tee "$OUT/smoke.txt"
    exit 1
fi
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.version.cuda)" | tee "$OUT/smoke.txt"
[ -f "$DATA" ] || python -m mlfast synth "$DATA" --rows 200000 --seed 1

SINGLE=(--peers deepfm,dcn --epochs 1 --batch-size 4096 --device cuda --quiet --no-cache)
COMMON=("${SINGLE[@]}" --backend nccl)

run() {  # run NAME NPROC ARGS...
    local name=$1 nproc=$2
    shift 2
    echo "== $name: $nproc process(es) $*" | tee -a "$OUT/smoke.txt"
    timeout 900 python -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m mlfast train "$DATA" \
        --out "$OUT/$name" --overwrite "${COMMON[@]}" "$@" >"$OUT/$name.log" 2>&1 \
        || { echo "FAILED: $name (log: $OUT/$name.log)" | tee -a "$OUT/smoke.txt"; tail -30 "$OUT/$name.log"; exit 1; }
    grep -E "samples/s|ensemble" "$OUT/$name.log" | tee -a "$OUT/smoke.txt"
    # one process reads the run (model.pt merged from the shards)
    timeout 300 python -m mlfast eval "$OUT/$name" "$DATA" --device cuda | tail -1 | tee -a "$OUT/smoke.txt"
}

# the single-process reference (and the single-GPU rate of the pair for the projection)
echo "== single process" | tee -a "$OUT/smoke.txt"
timeout 900 python -m mlfast train "$DATA" --out "$OUT/single" --overwrite "${SINGLE[@]}" >"$OUT/single.log" 2>&1 \
    || { echo "FAILED: single process (log: $OUT/single.log)" | tee -a "$OUT/smoke.txt"; exit 1; }
grep -E "samples/s|ensemble" "$OUT/single.log" | tee -a "$OUT/smoke.txt"

for mode in data peers both; do
    run "w1-$mode" 1 --parallel "$mode"
done
run "w1-peers-k4" 1 --parallel peers --exchange-every 4
if [ "$NGPU" -ge 2 ]; then
    run "w$NGPU-data" "$NGPU" --parallel data
    run "w2-peers" 2 --parallel peers
    run "w2-peers-k4" 2 --parallel peers --exchange-every 4
fi
if [ "$NGPU" -ge 4 ]; then
    run "w4-both" 4 --parallel both
fi
echo "all runs passed" | tee -a "$OUT/smoke.txt"
