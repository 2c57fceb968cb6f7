#!/usr/bin/env bash
# Every model crosstower has, and every distillation method, on MovieLens-100K P1, then
# `crosstower compare` over all of them: a table and the plot of accuracy against serving cost.
#   bash benchmarks/model_zoo.sh [DATA_DIR]
# Two lanes of one-thread runs side by side (on two cores, two one-thread runs finish sooner than
# the same runs one after another on two threads): the cross encoder and the students it teaches
# in one, every other model and the remaining students in the other. Runs go to runs/zoo/ (a
# finished run is kept and not rerun), the distilled students to runs/zoo/distill/; the report to
# runs/zoo/report/. The late-interaction and cross-encoder rows are the students' teachers
# themselves: trained into runs/zoo/distill/ under the names the distillation configs look for,
# the cross encoder with the overrides those configs give it (float32, since bfloat16 autocast is
# 8x slower on AVX2-only CPUs; 55 minutes), so each teacher trains once. About three and a half
# hours on two CPU cores; an interrupted zoo goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${1:-../shared/data}
MODELS=(
  popularity dssm youtubednn airbnb twotower-sa mvke inttower colbert cross
  alltoall-sa sparcode-sa sparcode-dnn dual
)
METHODS=(kd pfd endx ernie virt dide trmd)
CROSS_STUDENTS=(endx ernie virt dide trmd)  # trmd last: it also needs the late-interaction teacher
run() {  # run CONFIG OUT [--set KEY=VALUE ...]
  if [ -f "$2/metrics.json" ]; then echo "done already: $2"; return; fi
  mkdir -p "$(dirname "$2")"
  echo "$(date +%T) $2"
  .venv/bin/crosstower run "$1" --data-dir "$DATA_DIR" --set train.threads=1 --out "$2" "${@:3}" > "$2.log" 2>&1
}
model_dir() {  # where the zoo keeps a model's run (the teachers: where the students find them)
  case $1 in
    colbert|cross) echo "runs/zoo/distill/ml100k-$1-p1" ;;
    *) echo "runs/zoo/ml100k-$1-p1" ;;
  esac
}
student_dir() { echo "runs/zoo/distill/ml100k-distill-$1-p1"; }
colbert=$(model_dir colbert)
(  # the other lane: the late-interaction teacher first, then every other model and student
  run "configs/ml100k-colbert-p1.yaml" "$colbert"
  for name in "${MODELS[@]}"; do
    case $name in colbert|cross) continue ;; esac
    run "configs/ml100k-$name-p1.yaml" "$(model_dir "$name")"
  done
  for method in kd pfd; do run "configs/ml100k-distill-$method-p1.yaml" "$(student_dir "$method")"; done
) &
other=$!
run "configs/ml100k-cross-p1.yaml" "$(model_dir cross)" --set train.precision=fp32 --set train.max_minutes=55
for method in "${CROSS_STUDENTS[@]}"; do
  if [ "$method" = trmd ]; then  # its second teacher comes from the other lane
    while [ ! -f "$colbert/metrics.json" ] && kill -0 "$other" 2>/dev/null; do sleep 30; done
  fi
  run "configs/ml100k-distill-$method-p1.yaml" "$(student_dir "$method")"
done
wait "$other"
runs=()
for name in "${MODELS[@]}"; do runs+=("$(model_dir "$name")"); done
for method in "${METHODS[@]}"; do runs+=("$(student_dir "$method")"); done
.venv/bin/crosstower compare "${runs[@]}" --data-dir "$DATA_DIR" --out runs/zoo/report
