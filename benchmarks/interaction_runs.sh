#!/usr/bin/env bash
# Produce the interaction-rich scorer and pre-ranking numbers in docs/results.md: one
# `crosstower run` per config, one at a time on one thread each, then the tables, the
# late-interaction index sweep and the scoring costs. The cross encoders dominate: about 5.5 hours
# for the 17 synthetic epochs on one CPU thread (ml100k-cross-p1's 20-minute budget buys only one
# or two epochs there: its recorded run trained on a GPU), minutes on a GPU (DEVICE=cuda trains every run
# there, given a CUDA build of torch in .venv; indexes, serving and saved models stay on the CPU).
#   [DEVICE=cuda] bash benchmarks/interaction_runs.sh [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
DEVICE=${DEVICE:-cpu}
RUNS=(
  synthetic-colbert-p2 synthetic-mvke-p2 synthetic-inttower-p2
  ml100k-twotower-p4 ml100k-inttower-p4 ml100k-mvke-p4 ml100k-colbert-p4 ml100k-cross-p4
  ml100k-mvke-p2 ml100k-mvke-p1 ml100k-inttower-p2 ml100k-inttower-p1 ml100k-colbert-p2
  ml100k-colbert-p1 ml100k-cross-p2 ml100k-cross-p1 synthetic-cross-p2
)
for name in "${RUNS[@]}"; do
  .venv/bin/crosstower run "configs/$name.yaml" --data-dir "$DATA_DIR" --set train.threads=1 \
    --set train.device="$DEVICE" --out "runs/interaction/$name"
done
.venv/bin/python benchmarks/results_table.py --served "${RUNS[@]/#/runs/interaction/}" > runs/interaction/table.md
cat runs/interaction/table.md
.venv/bin/python benchmarks/late_interaction_index.py runs/interaction/synthetic-colbert-p2 --data-dir "$DATA_DIR"
# the two-tower, all-to-all and SparCode runs come from benchmarks/sparcode_runs.sh (issue 3)
.venv/bin/python benchmarks/scoring_cost.py runs/interaction/synthetic-{colbert,mvke,inttower,cross}-p2 \
  runs/reference/synthetic-{twotower-sa,alltoall-sa,sparcode-sa}-p2 --data-dir "$DATA_DIR"
.venv/bin/python benchmarks/synthetic_oracle.py
