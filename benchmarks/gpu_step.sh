#!/usr/bin/env bash
# The step benchmark on a CUDA GPU, in one go (benchmarks/bench_step.py --device cuda), then
# the host syncs of a step (benchmarks/count_host_syncs.py --device cuda, 60 s limit).
# Run from the repository root, after `pip install -e ".[dev]"`:
#     bash benchmarks/gpu_step.sh
# Output goes to stdout and, when $OUT is set, also to "$OUT/gpu_step.txt".
# The benchmark is stopped after BENCH_LIMIT seconds (default 360); with the 10 s and 30 s
# limits of the two checks before it, the 60 s of the sync count and 20 s of grace, the script
# ends within 480 s (8 min).
set -uo pipefail

cd "$(dirname "$0")/.."
LIMIT="${BENCH_LIMIT:-360}"
# Unbuffered: what was printed before a timeout still reaches the log.
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/gpu_step.txt"
else
    LOG=/dev/null
fi

{
    echo "== $(date -u '+%Y-%m-%dT%H:%M:%SZ') $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    timeout 10 nvidia-smi -L || echo "nvidia-smi -L failed (exit $?)"
    timeout 30 python -c 'import torch, pyro; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}), pyro {pyro.__version__}")'
    echo "== python benchmarks/bench_step.py --device cuda --batch-sizes 128 1024 --steps 100 --repeats 5 (limit ${LIMIT} s)"
    timeout --kill-after=10 "$LIMIT" python benchmarks/bench_step.py --device cuda \
        --batch-sizes 128 1024 --steps 100 --repeats 5
    status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "== stopped: over the ${LIMIT} s limit (exit $status)"
    else
        echo "== exit $status"
    fi
    echo "== python benchmarks/count_host_syncs.py --device cuda --steps 50 (limit 60 s)"
    timeout --kill-after=10 60 python benchmarks/count_host_syncs.py --device cuda --steps 50
    echo "== exit $?"
    exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
