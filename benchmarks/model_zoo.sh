#!/usr/bin/env bash
# Every model crosstower has, and every distillation method, on MovieLens-100K P1, then
# `crosstower compare` over all of them: a table and the plot of accuracy against serving cost.
#   bash benchmarks/model_zoo.sh [DATA_DIR] [PART]
# PART is one of
#   models   every model but the two teachers (about an hour on two CPU cores)
#   distill  the late-interaction and cross-encoder teachers and every distillation method's
#            student (about two and a half hours)
#   all      both (the default; about three and a half hours)
# Each part ends with its report (runs/zoo/report-models, runs/zoo/report-distill; `all`:
# runs/zoo/report over both). Parts run on different days join in one report without their run
# folders, from the reports alone:
#   crosstower compare runs/zoo/report-models runs/zoo/report-distill --out runs/zoo/report
# Runs are one thread each, in two lanes side by side (on two cores, two one-thread runs finish
# sooner than the same runs one after another on two threads). A run waits for the teachers it
# needs. Runs go to runs/zoo/ (a finished run is kept and not rerun; an interrupted part goes on
# where it stopped), the teachers and students to runs/zoo/distill/, where the distillation
# configs look for their teachers. The late-interaction and cross-encoder rows are those
# teachers, the cross encoder trained with the overrides the distillation configs give it
# (float32, since bfloat16 autocast is 8x slower on AVX2-only CPUs; 55 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
PART=${2:-all}
case $PART in models|distill|all) ;; *) echo "error: PART must be models, distill or all, not $PART" >&2; exit 2 ;; esac
MODELS=(popularity dssm youtubednn airbnb twotower-sa mvke inttower alltoall-sa sparcode-sa sparcode-dnn dual)
METHODS=(kd pfd endx ernie virt dide trmd)

run() {  # run CONFIG OUT [--set KEY=VALUE ...]
  if [ -f "$2/metrics.json" ]; then echo "done already: $2"; return; fi
  mkdir -p "$(dirname "$2")"
  echo "$(date +%T) $2"
  .venv/bin/crosstower run "$1" --data-dir "$DATA_DIR" --set train.threads=1 --out "$2" "${@:3}" > "$2.log" 2>&1
}
model_dir() { echo "runs/zoo/ml100k-$1-p1"; }
teacher_dir() { echo "runs/zoo/distill/ml100k-$1-p1"; }
student_dir() { echo "runs/zoo/distill/ml100k-distill-$1-p1"; }
student() { run "configs/ml100k-distill-$1-p1.yaml" "$(student_dir "$1")"; }
models_lane() {  # models_lane EVERY START: every other model of MODELS from START
  for ((i = $2; i < ${#MODELS[@]}; i += $1)); do
    run "configs/ml100k-${MODELS[$i]}-p1.yaml" "$(model_dir "${MODELS[$i]}")"
  done
}
cross=$(teacher_dir cross)
colbert=$(teacher_dir colbert)

if [ "$PART" != distill ]; then
  models_lane 2 1 & lane=$!
  models_lane 2 0
  wait "$lane"
  runs=(); for name in "${MODELS[@]}"; do runs+=("$(model_dir "$name")"); done
  .venv/bin/crosstower compare "${runs[@]}" --data-dir "$DATA_DIR" --out runs/zoo/report-models > /dev/null
fi
if [ "$PART" != models ]; then
  rm -f "$cross.failed"
  (  # lane B: late interaction and the students that need no cross encoder, then two that do
    run "configs/ml100k-colbert-p1.yaml" "$colbert"
    student kd
    student pfd
    while [ ! -f "$cross/metrics.json" ]; do  # lane A trains it
      if [ -f "$cross.failed" ]; then exit 1; fi
      sleep 30
    done
    student ernie
    student trmd
  ) & lane=$!
  run "configs/ml100k-cross-p1.yaml" "$cross" --set train.precision=fp32 --set train.max_minutes=55 \
    || { touch "$cross.failed"; wait "$lane" || true; echo "error: the cross encoder failed: $cross.log" >&2; exit 1; }
  student virt
  student dide
  student endx
  wait "$lane"
  runs=("$colbert" "$cross"); for method in "${METHODS[@]}"; do runs+=("$(student_dir "$method")"); done
  .venv/bin/crosstower compare "${runs[@]}" --data-dir "$DATA_DIR" --out runs/zoo/report-distill > /dev/null
fi
if [ "$PART" = all ]; then
  .venv/bin/crosstower compare runs/zoo/report-models runs/zoo/report-distill --out runs/zoo/report
fi
