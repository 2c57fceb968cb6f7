#!/usr/bin/env bash
# Produce the issue-3 numbers in docs/results.md (SparCode against two-tower and all-to-all):
# one `crosstower run` per config, one at a time (two jobs at once on a 2-core machine slow each
# other down), then the accuracy/sparsity trade-off of the SparCode-SA runs and its plot.
#   bash benchmarks/sparcode_runs.sh [DATA_DIR] [DATASET ...]     (default: all three data sets)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
shift || true
DATASETS=("${@:-synthetic ml100k mllatestsmall}")
MODELS=(sparcode-sa twotower-sa alltoall-sa sparcode-dnn twotower-dnn)
RUNS=()
for dataset in ${DATASETS[@]}; do
  for model in "${MODELS[@]}"; do
    name="$dataset-$model-p2"
    .venv/bin/crosstower run "configs/$name.yaml" --data-dir "$DATA_DIR" --out "runs/reference/$name"
    RUNS+=("runs/reference/$name")
  done
done
.venv/bin/python benchmarks/results_table.py --served "${RUNS[@]}" > runs/reference/sparcode-table.md
cat runs/reference/sparcode-table.md
TRADEOFF=()
for dataset in ${DATASETS[@]}; do TRADEOFF+=("runs/reference/$dataset-sparcode-sa-p2"); done
.venv/bin/python benchmarks/sparcode_tradeoff.py "${TRADEOFF[@]}" --data-dir "$DATA_DIR" \
  --out benchmarks/out/sparcode_tradeoff.json --plot docs/sparcode_tradeoff.png
