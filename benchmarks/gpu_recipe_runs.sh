#!/usr/bin/env bash
# The second round of GPU runs in docs/results.md ("One recipe for every model, on a GPU", issue 3):
# every model of the SparCode comparison trained with the recipe that lifted late interaction
# (issue 4): in-batch negatives with logQ beside the 30 uniform ones, a moving average of the
# weights (ema_decay 0.999), the learned item prior, patience 6; SparCode adds L1 1.0 on its
# per-token scores, ramped in over 500 steps. Each row is `crosstower run CONFIG` with $R plus
# the overrides named in the script.
#
#   [CT=crosstower] [DEVICE=cuda] [MINUTES=5] [EPOCHS=100] [DATASETS="synthetic ml100k"] [EXTRA=...] \
#     bash benchmarks/gpu_recipe_runs.sh [DATA_DIR] [OUT]
#
# The recorded runs ran 17 side by side on one H200 (one CPU thread each), each with a 5-minute
# training budget, then the trade-off of each SparCode run (benchmarks/sparcode_tradeoff.py).
# There crosstower ran from the source tree over the machine's CUDA torch:
#   CT="python3 -m crosstower.cli" PY=python3 bash benchmarks/gpu_recipe_runs.sh DATA_DIR runs/gr
# A quick check of the commands on a machine without a GPU: DEVICE=cpu MINUTES=0.01 EPOCHS=1
# DATASETS=synthetic EXTRA="--set dataset.options.num_users=300 --set dataset.options.num_items=200".
set -euo pipefail
DATA_DIR=${1:-../shared/data}
OUT=${2:-runs/gpu-recipe}
CT=${CT:-.venv/bin/crosstower}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
R="--set train.epochs=${EPOCHS:-100} --set train.patience=6 --set train.max_minutes=${MINUTES:-5}
   --set train.negatives.in_batch=true --set train.negatives.logq=true --set train.ema_decay=0.999
   --set model.item_bias=true ${EXTRA:-}"
DATASETS=${DATASETS:-synthetic ml100k}
L1="--set model.sparsity.weight=1.0 --set model.sparsity.ramp_steps=500"
HIST="--set model.user_tokens=20 --set model.user_tokens_from=history"
DNN="--set model.tokenizer=dnn --set train.lr=0.005"

launch() {  # NAME CONFIG [OVERRIDES...]
  local name=$1 config=$2
  shift 2
  $CT run "configs/$config.yaml" --data-dir "$DATA_DIR" --set train.device="$DEVICE" --set train.threads=1 \
    "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 &
}
run() {  # NAME CONFIG [OVERRIDES...], with the recipe
  local name=$1 config=$2
  shift 2
  # shellcheck disable=SC2086  # $R is a list of words
  launch "$name" "$config" $R "$@"
}
mkdir -p "$OUT"

if [[ " $DATASETS " == *" synthetic "* ]]; then
# Synthetic default: the bars' SA tokenizer, summary tokens.
run s-tt-sa synthetic-twotower-sa-p2
run s-a2a-sa synthetic-alltoall-sa-p2
run s-sc-sa synthetic-sparcode-sa-p2 $L1
run s-sc-sa-sb synthetic-sparcode-sa-p2 $L1 --set model.sparsity.bias=0.5
run s-sc-sa-n1024 synthetic-sparcode-sa-p2 $L1 --set model.quantizer.codebook_size=1024
# Synthetic default: one token per history item (late interaction's user side).
run s-a2a-sa-h synthetic-alltoall-sa-p2 $HIST --set model.sparsity.bias=0.5
run s-sc-sa-h synthetic-sparcode-sa-p2 $HIST $L1 --set model.sparsity.bias=0.5
run s-tt-dnn synthetic-twotower-dnn-p2
run s-a2a-dnn-h synthetic-alltoall-sa-p2 $DNN $HIST --set model.sparsity.bias=0.5
run s-sc-dnn-h synthetic-sparcode-dnn-p2 $HIST $L1 --set model.sparsity.bias=0.5
fi
if [[ " $DATASETS " == *" ml100k "* ]]; then
# MovieLens-100K P2, three training seeds of the bar's pair.
for seed in 0 1 2; do
  run "m-tt-sa-$seed" ml100k-twotower-sa-p2 --set train.seed=$seed
  run "m-sc-sa-$seed" ml100k-sparcode-sa-p2 $L1 --set train.seed=$seed
done
# Issue 4: the cross encoder under P1 (its config as it is, on the GPU budget).
launch m-cross-p1 ml100k-cross-p1 --set train.max_minutes="${MINUTES:-5}"
fi
wait  # no arguments: waits for every run and returns 0, so one failed run stops nothing

# What each SparCode run serves from a pruned index (usage, top-L and threshold rules).
for dir in "$OUT"/*-sc-*/; do
  [ -f "$dir/metrics.json" ] || continue
  name=$(basename "$dir")
  $PY benchmarks/sparcode_tradeoff.py "$dir" --data-dir "$DATA_DIR" --fractions 0.1 0.01 \
    --out "$OUT/$name-tradeoff.json" > "$OUT/$name-tradeoff.log" 2>&1 &
done
wait
