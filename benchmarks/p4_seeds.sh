#!/usr/bin/env bash
# The five-seed P4 tables of docs/results.md: pre-rankers on MovieLens-100K P4, training seeds
# 0..4, one thread each and two runs side by side, then test AUC per seed and mean ± standard
# deviation per model. MODELS picks the configs (default the fast three: two-tower, IntTower,
# MVKE, about 2.5 minutes on two cores; MODELS="colbert cross" takes about half an hour).
#   [MODELS="..."] [OUT=runs/...] bash benchmarks/p4_seeds.sh [DATA_DIR] [EXTRA --set ARGS...]
# e.g. `bash benchmarks/p4_seeds.sh ../shared/data --set split.statistics=entity`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
shift || true
OUT=${OUT:-runs/p4_seeds}
read -r -a MODELS <<< "${MODELS:-twotower inttower mvke}"
mkdir -p "$OUT"
for seed in 0 1 2 3 4; do
  for model in "${MODELS[@]}"; do
    .venv/bin/crosstower run "configs/ml100k-$model-p4.yaml" --data-dir "$DATA_DIR" --set train.threads=1 \
      --set train.seed="$seed" "$@" --out "$OUT/$model-s$seed" > "$OUT/$model-s$seed.log" 2>&1 &
    while (( $(jobs -rp | wc -l) >= 2 )); do wait -n; done
  done
done
wait
.venv/bin/python - "$OUT" "${MODELS[@]}" <<'PY'
import json, statistics, sys
out, models = sys.argv[1], sys.argv[2:]
print("| model | val AUC (mean) | test AUC, seeds 0..4 | test AUC mean ± sd | test GAUC (mean) | test log loss (mean) |")
print("|---|---|---|---|---|---|")
for model in models:
    runs = [json.load(open(f"{out}/{model}-s{s}/metrics.json"))["metrics"] for s in range(5)]
    test = [r["test"]["auc"] for r in runs]
    mean = lambda key, part="test": statistics.mean(r[part][key] for r in runs)
    print(f"| {model} | {mean('auc', 'val'):.4f} | {', '.join(f'{a:.4f}' for a in test)} | "
          f"{statistics.mean(test):.4f} ± {statistics.stdev(test):.4f} | {mean('gauc'):.4f} | {mean('logloss'):.4f} |")
PY
