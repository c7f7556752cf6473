#!/usr/bin/env bash
# One call on a lent GPU machine (docs/gpu-check.md, "Running it on a lent device"):
#   1. install the wheels carried in .gpu-wheels/ (`make gpu-wheels` here; the machine reaches no
#      package index, and its image lacks FastAPI, Starlette and uvicorn, so without them the HTTP
#      server's CUDA tests are not collected);
#   2. `make gpu-check` (every step time-boxed; at most 595 s);
#   3. copy the files it wrote into OUT (the device tool brings back what lies there);
#   4. bench/graphs_overhead.py into OUT (the no-exits gap, launch-ahead against reading every count,
#      NCHW and channels_last).
# The exit status is gpu-check's. `--dry-run` prints gpu-check's plan and runs the overhead bench's
# CPU smoke run instead (tests/test_gpu_check.py runs it so).
#
#   tools/gpu_session.sh "$OUT"            # device tool: run(command='tools/gpu_session.sh $OUT', carry=['.gpu-wheels'])
set -uo pipefail
out=${1:?usage: tools/gpu_session.sh OUT_DIR [--dry-run]}
mode=${2:-}
py=${GPU_PYTHON:-python3}
wheels=${GPU_WHEELS_DIR:-.gpu-wheels}
mkdir -p "$out"
if compgen -G "$wheels/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps "$wheels"/*.whl 2>&1 | tail -3 \
        || echo "[gpu-session] the carried wheels did not install; the HTTP tests will not be collected"
fi
stamp=$(mktemp)
if [ "$mode" = --dry-run ]; then
    make --no-print-directory gpu-check GPU_PYTHON="$py" GPU_CHECK_ARGS=--dry-run
else
    make --no-print-directory gpu-check GPU_PYTHON="$py"
fi
rc=$?
find bench/results -maxdepth 1 -type f -newer "$stamp" -exec cp {} "$out"/ \;
rm -f "$stamp"
if [ "$mode" = --dry-run ]; then
    timeout 300 "$py" bench/graphs_overhead.py --quick --out "$out" | tail -2
else
    timeout 120 "$py" bench/graphs_overhead.py --res 224 --batches 256,64 --out "$out" | tail -2
fi
ls -la "$out"
exit $rc
