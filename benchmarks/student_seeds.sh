#!/usr/bin/env bash
# Three-seed rows of the distillation tables: each config of CONFIGS for training seeds 0, 1 and 2,
# one thread a run, one lane of seeds per config and two lanes side by side, then the table (mean ±
# sd per config) by benchmarks/distill_table.py. Extra arguments are --set overrides for every run,
# e.g. an epoch budget instead of a wall-clock one, so that runs beside a lighter or heavier job
# still train alike:
#   [CONFIGS="..."] [OUT=runs/distill] bash benchmarks/student_seeds.sh [DATA_DIR] [--set KEY=VALUE ...]
#   bash benchmarks/student_seeds.sh ../shared/data --set train.max_minutes=null --set train.epochs=10
# A distillation config trains its teacher into OUT the first time (its lane's seed 0) and reuses it
# after; configs that share a teacher race for it in parallel lanes, so train it once first (one
# seed of one of them) or keep a finished one in OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
shift || true
OUT=${OUT:-runs/distill}
read -r -a CONFIGS <<< "${CONFIGS:-synthetic-dual-p2 synthetic-distill-virt-p2}"
mkdir -p "$OUT"
runs=()
for name in "${CONFIGS[@]}"; do
  (
    for seed in 0 1 2; do
      out="$OUT/$name-s$seed"
      [ -f "$out/metrics.json" ] && continue
      .venv/bin/crosstower run "configs/$name.yaml" --data-dir "$DATA_DIR" --set train.threads=1 \
        --set train.seed="$seed" "$@" --out "$out" > "$out.log" 2>&1
    done
  ) &
  while (( $(jobs -rp | wc -l) >= 2 )); do wait -n; done
  for seed in 0 1 2; do runs+=("$OUT/$name-s$seed"); done
done
wait
.venv/bin/python benchmarks/distill_table.py --seeds "${runs[@]}"
