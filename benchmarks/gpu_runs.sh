#!/usr/bin/env bash
# The GPU runs of docs/results.md ("Runs on a GPU" in the issue-3 and issue-4 sections): each is
# `crosstower run CONFIG --set train.device=cuda` with the overrides named in its table row.
#
#   [CT=crosstower] bash benchmarks/gpu_runs.sh [DATA_DIR]    (default ../shared/data)
#
# It needs a CUDA device and crosstower installed over a CUDA build of torch (`make install`
# puts the CPU wheel in .venv; CT names another installation's command).
#
# The recorded runs ran side by side on one H200 (10-14 at a time, one CPU thread each), so a
# 5-minute budget (`train.max_minutes`) bought 9-16 epochs; run alone, a run gets further within
# the same budget. Rows that patience stopped do not depend on that speed.
set -euo pipefail
DATA_DIR=${1:-../shared/data}
CT=${CT:-.venv/bin/crosstower}
OUT=runs/gpu
S="--set train.epochs=100 --set train.patience=5 --set train.max_minutes=5"
IB="--set train.negatives.in_batch=true --set train.negatives.logq=true"
T1="--set model.temperature=1.0 --set train.ema_decay=0"

run() {  # NAME CONFIG [OVERRIDES...]
  local name=$1 config=$2
  shift 2
  $CT run "configs/$config.yaml" --data-dir "$DATA_DIR" --set train.device=cuda --set train.threads=1 \
    "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 &
}
mkdir -p "$OUT"

# Issue 3, synthetic default: longer training and in-batch negatives for every model of the comparison.
run s-a2a synthetic-alltoall-sa-p2 $S
run s-a2a-ib synthetic-alltoall-sa-p2 $S $IB
run s-tt-ib synthetic-twotower-sa-p2 $S $IB
run s-sc synthetic-sparcode-sa-p2 $S
run s-sc-ib synthetic-sparcode-sa-p2 $S $IB
run s-sc-ib-l1 synthetic-sparcode-sa-p2 $S $IB --set model.sparsity.weight=0.5
run s-sc-ib-k8 synthetic-sparcode-sa-p2 $S $IB --set model.user_tokens=8
# Issue 3, MovieLens-100K P2: three training seeds of SparCode-SA and two-tower-SA, in-batch negatives.
for seed in 0 1 2; do
  run "m-sc-ib-$seed" ml100k-sparcode-sa-p2 $S $IB --set train.seed=$seed
  run "m-tt-ib-$seed" ml100k-twotower-sa-p2 $S $IB --set train.seed=$seed
done
run m-sc ml100k-sparcode-sa-p2 $S
wait

# Issue 4, synthetic default: late-interaction variants (at temperature 1.0 and without the weight
# average, the config's values then).
run s-colbert-p64 synthetic-colbert-p2 $S $T1 --set model.projection_dim=64
run s-colbert-d128 synthetic-colbert-p2 $S $T1 --set model.dim=128 --set model.projection_dim=64
run s-colbert-n100 synthetic-colbert-p2 $S $T1 --set train.negatives.num=100
run s-colbert-b1024 synthetic-colbert-p2 $S $T1 --set train.batch_size=1024 --set train.lr=0.004
# The cross encoders of the issue-4 tables, whole (their configs hold the recorded epochs).
run synthetic-cross-p2 synthetic-cross-p2
run ml100k-cross-p2 ml100k-cross-p2
wait
