#!/usr/bin/env bash
# The three-seed MovieLens-100K P2 table of docs/results.md (issue 3's ML-100K bar): two-tower
# DNN, two-tower SA as configured and with late interaction's recipe (SparCode-late's own:
# in-batch negatives with logQ, the item prior, the weight average, patience 6), and SparCode on
# late interaction's towers with product and with residual codes; training seeds 0..2, one
# thread each, JOBS runs at a time (default 1: run it beside nothing else, or beside one other
# one-thread job). Then served and exhaustive test Recall@50 per seed and mean ± standard
# deviation per variant. A run whose folder already holds metrics.json is not run again, so an
# interrupted table resumes.
#   [JOBS=1] [OUT=runs/ml100k_p2_seeds] bash benchmarks/ml100k_p2_seeds.sh [DATA_DIR] [EXTRA --set ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
shift || true
OUT=${OUT:-runs/ml100k_p2_seeds}
JOBS=${JOBS:-1}
RECIPE="--set train.negatives.in_batch=true --set train.negatives.logq=true --set model.item_bias=true
  --set train.ema_decay=0.999 --set train.patience=6 --set train.epochs=40 --set train.max_minutes=15"
declare -A CONFIG=([twotower-dnn]=ml100k-twotower-dnn-p2 [twotower-sa]=ml100k-twotower-sa-p2
  [twotower-sa-recipe]=ml100k-twotower-sa-p2 [sparcode-late]=ml100k-sparcode-late-p2 [sparcode-late-residual]=ml100k-sparcode-late-p2)
declare -A OVERRIDES=([twotower-dnn]="" [twotower-sa]="" [twotower-sa-recipe]="$RECIPE" [sparcode-late]=""
  [sparcode-late-residual]="--set model.quantizer.kind=residual")
VARIANTS=(twotower-dnn twotower-sa twotower-sa-recipe sparcode-late sparcode-late-residual)
mkdir -p "$OUT"
for seed in 0 1 2; do
  for variant in "${VARIANTS[@]}"; do
    [[ -f "$OUT/$variant-s$seed/metrics.json" ]] && continue
    # shellcheck disable=SC2086  # OVERRIDES holds several words on purpose
    .venv/bin/crosstower run "configs/${CONFIG[$variant]}.yaml" --data-dir "$DATA_DIR" --set train.threads=1 \
      --set train.seed="$seed" ${OVERRIDES[$variant]} "$@" --out "$OUT/$variant-s$seed" \
      > "$OUT/$variant-s$seed.log" 2>&1 &
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
  done
done
wait
.venv/bin/python - "$OUT" "${VARIANTS[@]}" <<'PY'
import json, statistics, sys
out, variants = sys.argv[1], sys.argv[2:]
print("| variant | test Recall@50, seeds 0..2 | mean ± sd | served Recall@50, seeds 0..2 | mean ± sd | epochs (best) |")
print("|---|---|---|---|---|---|")
for variant in variants:
    runs = [json.load(open(f"{out}/{variant}-s{s}/metrics.json")) for s in range(3)]
    cells = []
    for part in ("test", "test_served"):
        if part not in runs[0]["metrics"]:
            cells += ["", ""]
            continue
        values = [r["metrics"][part]["recall@50"] for r in runs]
        cells += [", ".join(f"{v:.4f}" for v in values), f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"]
    epochs = ", ".join(f"{r['timing']['epochs']} ({r['timing']['best_epoch']})" for r in runs)
    print(f"| {variant} | {' | '.join(cells)} | {epochs} |")
PY
