#!/usr/bin/env bash
# Produce every number in docs/results.md: one `crosstower run` per config, one at a time
# (two jobs at once on a 2-core machine slow each other down), then the markdown table.
#   bash benchmarks/reference_runs.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
CONFIGS=(
  synthetic-popularity-p2 synthetic-dssm-p2 synthetic-youtubednn-p2
  ml100k-popularity-p1 ml100k-dssm-p1 ml100k-youtubednn-p1
  ml100k-popularity-p2 ml100k-dssm-p2 ml100k-youtubednn-p2
  mllatestsmall-popularity-p2 mllatestsmall-dssm-p2 mllatestsmall-youtubednn-p2
  beauty-popularity-p2 beauty-dssm-p2 beauty-youtubednn-p2
)
for name in "${CONFIGS[@]}"; do
  .venv/bin/crosstower run "configs/$name.yaml" --data-dir "$DATA_DIR" --out "runs/reference/$name"
done
.venv/bin/python benchmarks/results_table.py "${CONFIGS[@]/#/runs/reference/}" > runs/reference/table.md
cat runs/reference/table.md
