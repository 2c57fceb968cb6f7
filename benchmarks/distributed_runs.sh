#!/usr/bin/env bash
# One config trained in one process and on N processes (torchrun, gloo on the CPU), one thread
# each, one after the other (the N-process run takes N cores), then both rows: test Recall@50,
# served Recall@50, epochs and training seconds. With sampled negatives only, a step on N
# processes is the step of one process with the same global batch, so the two runs should agree
# up to float rounding.
#   [NPROC=2] [OUT=runs/distributed] bash benchmarks/distributed_runs.sh [CONFIG] [DATA_DIR] [EXTRA --set ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/ml100k-dssm-p1.yaml}
DATA_DIR=${2:-../shared/data}
shift 2 || shift $# || true
NPROC=${NPROC:-2}
OUT=${OUT:-runs/distributed}
NAME=$(basename "$CONFIG" .yaml)
mkdir -p "$OUT"
.venv/bin/crosstower run "$CONFIG" --data-dir "$DATA_DIR" --set train.threads=1 "$@" \
  --out "$OUT/$NAME-1proc" > "$OUT/$NAME-1proc.log" 2>&1
.venv/bin/torchrun --nproc_per_node "$NPROC" -m crosstower run "$CONFIG" --data-dir "$DATA_DIR" \
  --set train.threads=1 "$@" --out "$OUT/$NAME-${NPROC}proc" > "$OUT/$NAME-${NPROC}proc.log" 2>&1
.venv/bin/python - "$OUT/$NAME-1proc" "$OUT/$NAME-${NPROC}proc" <<'PY'
import json, sys
print("| run | processes | test Recall@50 | served Recall@50 | epochs | train s |")
print("|---|---|---|---|---|---|")
for run in sys.argv[1:]:
    m = json.load(open(f"{run}/metrics.json"))
    t = m["timing"]
    served = m["metrics"].get("test_served", m["metrics"]["test"])["recall@50"]
    print(f"| {run} | {t.get('processes', 1)} | {m['metrics']['test']['recall@50']:.4f} | {served:.4f} "
          f"| {t['epochs']} | {t['train_seconds']:.0f} |")
PY
