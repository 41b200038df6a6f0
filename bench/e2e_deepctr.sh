#!/usr/bin/env bash
# End to end, raw Criteo-format file to a trained DeepFM, mlfast against DeepCTR-Torch, in one
# sitting on this machine (issue: "End to end on 500k generated rows ... >= 3x DeepCTR-Torch").
#
#   bash bench/e2e_deepctr.sh [ROWS]        # default 500000; writes bench/results/e2e_cpu_<cpu>.json
#
# DeepCTR-Torch is installed from PyPI into its own venv (/tmp/mlfast-e2e-deepctr), next to the
# same torch (2.13.0, CPU) that mlfast's venv has; its side is bench/e2e_deepctr.py. mlfast runs in
# the active venv. Both: the same generated rows, DeepFM, dim 16, MLP 400-400-400 + BN + dropout
# 0.2, Adam 1e-3, batch 4096, one epoch, timed from process start (imports included) to the end;
# both train on the file's first 80 % of rows and report AUC on the next 10 % (the same rows: mlfast
# gets them as --valid, cut from the file before the clocks start), each with its own usual
# features: DeepCTR-Torch's example (label-encoded categoricals, min-max-scaled integers as dense
# inputs), mlfast's default (FuxiCTR's: hashed categoricals, integers bucketed as categoricals).
# MLFAST_E2E_ARGS adds options to the mlfast side (e.g. --use-dense).
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-500000}
WORK=${MLFAST_E2E_DIR:-/tmp/mlfast-e2e}
VENV=/tmp/mlfast-e2e-deepctr
mkdir -p "$WORK" bench/results
DATA="$WORK/criteo_synth_${ROWS}.tsv"
[ -f "$DATA" ] || mlfast synth "$DATA" --rows "$ROWS" --seed 3
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q deepctr-torch pandas scikit-learn requests  # deepctr-torch imports requests
fi
echo "== DeepCTR-Torch"
"$VENV/bin/python" bench/e2e_deepctr.py "$DATA" --json "$WORK/deepctr.json"
echo "== mlfast"
rm -rf "$WORK/mlfast-run"
# the rows DeepCTR-Torch trains on, validates on, and the rest (mlfast's test split)
head -n $((ROWS * 8 / 10)) "$DATA" > "$WORK/train.tsv"
sed -n "$((ROWS * 8 / 10 + 1)),$((ROWS * 9 / 10))p" "$DATA" > "$WORK/valid.tsv"
tail -n +$((ROWS * 9 / 10 + 1)) "$DATA" > "$WORK/test.tsv"
t0=$(date +%s.%N)
# shellcheck disable=SC2086
mlfast train "$WORK/train.tsv" --valid "$WORK/valid.tsv" --test "$WORK/test.tsv" --peers deepfm --epochs 1 \
  --batch-size 4096 --no-cache --quiet --out "$WORK/mlfast-run" ${MLFAST_E2E_ARGS:-} > "$WORK/mlfast.txt"
t1=$(date +%s.%N)
python - "$WORK" "$t0" "$t1" "$ROWS" "${MLFAST_E2E_ARGS:-}" <<'PY'
import json, platform, sys
from pathlib import Path
work, t0, t1, rows = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
d = json.loads((work / "deepctr.json").read_text())
m = json.loads((work / "mlfast-run" / "metrics.json").read_text())
from mlfast.ops.cpu_features import cpu_features
mine = {"tool": "mlfast", "args": sys.argv[5], "total_s": t1 - t0, "train_s": m["train"]["train_seconds"],
        "train_samples_per_s": m["train"]["samples_per_second"], "valid_auc": m["valid"]["deepfm"]["auc"]}
res = {"rows": rows, "cpu": cpu_features(), "deepctr_torch": d, "mlfast": mine,
       "x_end_to_end": d["total_s"] / mine["total_s"], "x_training": mine["train_samples_per_s"] / d["train_samples_per_s"]}
model = (res["cpu"].get("model") or "").lower()
kind = next((k for k in ("epyc", "xeon") if k in model), "cpu")  # results of each machine type kept apart
Path(f"bench/results/e2e_cpu_{kind}.json").write_text(json.dumps(res, indent=1) + "\n")
print(f"end to end: DeepCTR-Torch {d['total_s']:.1f} s, mlfast {mine['total_s']:.1f} s: x{res['x_end_to_end']:.2f}")
print(f"training: {d['train_samples_per_s']:,.0f} vs {mine['train_samples_per_s']:,.0f} samples/s: x{res['x_training']:.2f}")
print(f"valid AUC (the same rows, 80-90 % of the file): DeepCTR-Torch {d['valid_auc']:.4f}, mlfast {mine['valid_auc']:.4f}")
PY
