#!/usr/bin/env bash
# One call on a lent GPU machine (docs/gpu-check.md, "Running it on a lent device"):
#   1. install the wheels carried in .gpu-wheels/ (`make gpu-wheels` here; the machine reaches no
#      package index, and its image lacks FastAPI, Starlette and uvicorn, so without them the HTTP
#      server's CUDA tests are not collected);
#   2. `make gpu-check` (every step time-boxed; at most 595 s);
#   3. bench/graphs_overhead.py (the no-exits gap, launch-ahead against reading every count, NCHW
#      and channels_last);
#   4. bench/serve_machinery.py on the machine's CPU (the scheduler's host Python per request
#      against request batching's, on that host: docs/serving.md, "The serving machinery's own cost");
#   5. OUT gets gpu-check's files in gpu-check.tar.gz and the benches' in gpu-extras.tar.gz, each
#      with its .md reports and logs beside it, 3 and 2 at most (the device tool brings back at most
#      8 files).
# The exit status is gpu-check's. `--dry-run` prints gpu-check's plan and runs the benches' CPU
# smoke runs instead (tests/test_gpu_check.py runs it so).
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
# Each part's files go out as soon as it ends, in one archive with its .md reports and logs
# beside it (at most 8 files come back from a device; a call cut off at its time limit still
# brings back the parts that ended).
pack() {  # pack NAME DIR REPORTS: the archive, and up to REPORTS of its .md and .log files beside it
    tar czf "$out/$1.tar.gz" -C "$2" .
    find "$2" -maxdepth 1 -type f \( -name '*.md' -o -name '*.log' \) | sort | head -"$3" | xargs -r cp -t "$out"
    rm -rf "$2"
}
part=$(mktemp -d)
find bench/results -maxdepth 1 -type f -newer "$stamp" -exec cp {} "$part"/ \;
rm -f "$stamp"
pack gpu-check "$part" 3
part=$(mktemp -d)
if [ "$mode" = --dry-run ]; then
    timeout 300 "$py" bench/graphs_overhead.py --quick --out "$part" | tail -2
    timeout 120 "$py" bench/serve_machinery.py --quick --out "$part" | tail -1
else
    timeout 120 "$py" bench/graphs_overhead.py --res 224 --batches 256,64 --out "$part" | tail -2
    timeout 45 "$py" bench/serve_machinery.py --repeats 9 --capacity-repeats 5 --out "$part" | tail -1
fi
pack gpu-extras "$part" 2
ls -la "$out"
exit $rc
