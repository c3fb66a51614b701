#!/usr/bin/env bash
# The one command for a lent GPU machine (H100/H200, no internet, no deepspeed/flash-attn needed):
#
#   bash benchmarks/gpu_check.sh            # full check, about 2-4 minutes on an H100, hard limit below
#   bash benchmarks/gpu_check.sh --quick    # fewer models/sizes/steps
#
# Results: $OUT/gpu_check.json when $OUT is set, else benchmarks/results/gpu_check.json.
# Extra arguments go to benchmarks/gpu_check.py (see --help). GPU_CHECK_TIMEOUT (seconds, default 450)
# is the hard limit; the python stops starting new measurements 45 s before it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
LIMIT="${GPU_CHECK_TIMEOUT:-450}"
PY="${PYTHON:-python}"

echo "== $(date -u +%FT%TZ) packtrain gpu_check, limit ${LIMIT}s"
echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi not available)"
echo "== $($PY --version 2>&1) at $(command -v "$PY")"

timeout --signal=TERM --kill-after=20 "$LIMIT" "$PY" benchmarks/gpu_check.py --budget-s "$((LIMIT - 45))" "$@"
rc=$?
if [ "$rc" -eq 124 ]; then
  echo "== gpu_check.py hit the ${LIMIT}s limit; the JSON holds what finished"
fi
echo "== gpu_check.py exit code $rc"
exit "$rc"
