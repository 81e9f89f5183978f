#!/usr/bin/env bash
# GPU check for a CUDA machine (written for one H200), in a copy of the repo: the CUDA tests, the Triton
# tests on the real device (TRITON_INTERPRET unset), then the CUDA benchmarks. Under 8 minutes in all.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
#
# Writes benchmarks/results/{lif,attention,tdformer-train,similarity}-cuda.json, regenerates benchmarks/results/README.md and keeps
# logs in benchmarks/results/logs/. If $OUT is set, copies the result files and logs there (flat).
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch, spikecore" 2>/dev/null; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python
    fi
fi
unset TRITON_INTERPRET
LOGS=benchmarks/results/logs
mkdir -p "$LOGS"

echo "== python: $PYTHON"
"$PYTHON" - <<'EOF'
import torch, triton
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"== torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true

failed=()
step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to $LOGS/NAME.log, record failure
    local name=$1 limit=$2 rc=0
    shift 2
    echo "== [$name] $* (limit ${limit}s)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" || rc=$?
    # pytest exit 5 = no test selected (no cuda-marked tests yet): not a failure
    if [[ $rc -ne 0 && ! ( $rc -eq 5 && $name == test-* ) ]]; then
        failed+=("$name (exit $rc)")
    fi
    echo "== [$name] exit $rc after $((SECONDS - start))s"
}

step test-cuda 90 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider
step test-triton 120 "$PYTHON" -m pytest -q -k triton -p no:cacheprovider shared/spikecore/tests
step bench 260 "$PYTHON" benchmarks/run_all.py --device cuda

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp -f benchmarks/results/*-cuda.json benchmarks/results/README.md "$LOGS"/*.log "$OUT"/ 2>/dev/null || true
    echo "== copied results and logs to $OUT"
fi

if ((${#failed[@]})); then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all GPU checks passed"
