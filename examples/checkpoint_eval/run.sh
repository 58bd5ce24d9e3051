#!/usr/bin/env bash
# Checkpoint evaluation end to end: a local cluster up, the evaluation job, the cluster down.
#   examples/checkpoint_eval/run.sh                       # 2 checkpoints x arith,capitals x 2 seeds, vLLM CPU
#   BACKEND=simulator examples/checkpoint_eval/run.sh     # the plumbing only, in seconds
# Environment knobs: CHECKPOINTS, BENCHMARKS, SEEDS, CONCURRENCY, BACKEND, OUT, CLUSTER.
set -euo pipefail
cd "$(dirname "$0")/../.."
AM=.venv/bin/agentmesh
PY=.venv/bin/python
CLUSTER=${CLUSTER:-ckpt-eval}
OUT=${OUT:-/tmp/ckpt-eval}

"$AM" cluster up --name "$CLUSTER"
trap '"$AM" cluster down --name "$CLUSTER"' EXIT
status=0
time "$PY" -m agentmesh.pipelines.checkpoint_eval \
    --cluster "$CLUSTER" \
    --backend "${BACKEND:-vllm-cpu}" \
    --checkpoints "${CHECKPOINTS:-2}" \
    --benchmarks "${BENCHMARKS:-arith,capitals}" \
    --seeds "${SEEDS:-2}" \
    --concurrency "${CONCURRENCY:-1}" \
    --out "$OUT" || status=$?
# 0: every task succeeded; 1: the table was printed, some tasks failed; 2: bad input; 3: failure.
if [ "$status" -le 1 ]; then echo "report: $OUT/results.json, $OUT/table.txt, $OUT/accuracy.png"; fi
exit "$status"
