#!/usr/bin/env bash
# Every model crosstower has, and every distillation method, on MovieLens-100K P1: one run per
# config, one at a time (two jobs at once on a 2-core machine slow each other down), then
# `crosstower compare` over all of them: a table and the plot of accuracy against serving cost.
#   bash benchmarks/model_zoo.sh [DATA_DIR] [THREADS]
# Runs go to runs/zoo/ (a finished run is kept and not rerun), the distilled students to
# runs/zoo/distill/; the report to runs/zoo/report/. The late-interaction and cross-encoder rows
# are the students' teachers themselves: trained into runs/zoo/distill/ under the names the
# distillation configs look for, the cross encoder with the overrides those configs give it
# (float32, since bfloat16 autocast is 8x slower on AVX2-only CPUs; 55 minutes), so each
# teacher trains once. Several hours on two CPU cores (the cross encoder most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
THREADS=${2:-2}
MODELS=(
  popularity dssm youtubednn airbnb twotower-sa mvke inttower colbert cross
  alltoall-sa sparcode-sa sparcode-dnn dual
)
METHODS=(kd pfd endx ernie virt dide trmd)
run() {  # run CONFIG OUT [--set KEY=VALUE ...]
  if [ -f "$2/metrics.json" ]; then echo "done already: $2"; return; fi
  .venv/bin/crosstower run "$1" --data-dir "$DATA_DIR" --set "train.threads=$THREADS" --out "$2" "${@:3}"
}
model_dir() {  # where the zoo keeps a model's run (the teachers: where the students find them)
  case $1 in
    colbert|cross) echo "runs/zoo/distill/ml100k-$1-p1" ;;
    *) echo "runs/zoo/ml100k-$1-p1" ;;
  esac
}
for name in "${MODELS[@]}"; do
  extra=()
  [ "$name" = cross ] && extra=(--set train.precision=fp32 --set train.max_minutes=55)
  run "configs/ml100k-$name-p1.yaml" "$(model_dir "$name")" "${extra[@]}"
done
for method in "${METHODS[@]}"; do
  run "configs/ml100k-distill-$method-p1.yaml" "runs/zoo/distill/ml100k-distill-$method-p1"
done
runs=()
for name in "${MODELS[@]}"; do runs+=("$(model_dir "$name")"); done
for method in "${METHODS[@]}"; do runs+=("runs/zoo/distill/ml100k-distill-$method-p1"); done
.venv/bin/crosstower compare "${runs[@]}" --data-dir "$DATA_DIR" --out runs/zoo/report
