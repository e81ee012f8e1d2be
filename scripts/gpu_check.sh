#!/usr/bin/env bash
# One prepared GPU check for a single-GPU machine (H100 / H200; no internet; PyTorch preinstalled).
#
#   bash scripts/gpu_check.sh            # from anywhere; runs in the repository root
#
# 1. installs xformers from .whl/xformers-*.whl when that wheel is there (into /tmp, nothing
#    else is touched); without it the xformers tests are skipped and the bench runs sdpa only.
#    To bring it (on a machine with pip access, in the repo root; .whl/ is git-ignored):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 -d .whl xformers==0.0.35
#    and carry `.whl` to the GPU machine.
# 2. prints nvidia-smi, torch / CUDA / xformers versions and the xformers kernels available;
# 3. runs the GPU tests and the CPU attention-backend tests (pytest);
# 4. benchmarks a Mistral-7B-shaped bf16 model (random weights) at batch 1 and 8: eager with sdpa
#    and xformers, then sdpa with torch.compile + CUDA graphs, then sdpa with torch.compile;
# 5. prints the results table last (and whether batch 1 reaches --goal tok/s).
#
# Every step has a timeout and the whole script stops within $BUDGET_S seconds (default 450);
# a step that fails or times out does not stop the later ones. Logs and results go to
# $OUT (when set, e.g. on the device machine) or /tmp/gpu_check. Exit status: non-zero if the
# tests failed, or if no benchmark row was produced.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$((START + BUDGET_S))
PY=${PYTHON:-python3}
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
RESULTS="$LOGS/bench.jsonl"
rm -f "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0

say() { printf '\n=== [%3ds] %s\n' "$(($(date +%s) - START))" "$*"; }

# step CAP_SECONDS LOGNAME CMD...: run CMD with at most CAP seconds (less if the budget is short).
step() {
    local cap=$1 name=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - 10))
    if ((left < 20)); then
        say "skipped $name: only ${left}s of the budget left"
        return 1
    fi
    ((cap > left)) && cap=$left
    say "$name (timeout ${cap}s): $*"
    local rc=0
    timeout -k 10 "$cap" "$@" 2>&1 | tee "$LOGS/$name.log" || rc=$?
    ((rc == 124 || rc == 137)) && say "$name TIMED OUT after ${cap}s"
    ((rc != 0)) && say "$name exited with status $rc"
    return $rc
}

say "xformers wheel"
shopt -s nullglob
wheels=(.whl/xformers-*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/xformers-site "${wheels[@]}"; then
        export PYTHONPATH=/tmp/xformers-site${PYTHONPATH:+:$PYTHONPATH}
        echo "installed ${wheels[*]} into /tmp/xformers-site"
    else
        echo "could not install ${wheels[*]}: going on without xformers"
    fi
else
    echo "no .whl/xformers-*.whl: xformers tests skip, the bench runs sdpa only (unless xformers is installed)"
fi

say "machine"
timeout 30 nvidia-smi || echo "nvidia-smi failed"
timeout 120 "$PY" - <<'EOF' || echo "environment probe failed"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}", p.multi_processor_count, "SMs")
try:
    import xformers, xformers.ops  # noqa: F401
    print("xformers", xformers.__version__, "from", xformers.__file__)
except Exception as e:
    print("xformers: not importable:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
EOF
if "$PY" -c "import xformers" 2>/dev/null; then
    timeout 60 "$PY" -m xformers.info 2>&1 | grep -E "memory_efficient_attention\.|pytorch\.|gpu\.|build\.cuda" || true
fi

tests_rc=0
step 170 pytest "$PY" -m pytest tests/test_gpu.py tests/test_attention_backends.py -q -ra -p no:cacheprovider \
    || tests_rc=$?
((tests_rc != 0)) && status=1

step 120 bench_eager "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa xformers --compile none || true
step 150 bench_cudagraphs "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa --compile cudagraphs || true
step 150 bench_compile "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa --compile default || true

say "summary (tests: $([ $tests_rc = 0 ] && echo passed || echo "FAILED, status $tests_rc"); logs in $LOGS)"
grep -E "passed|failed|error" "$LOGS/pytest.log" 2>/dev/null | tail -n 3 || true
[ -s "$RESULTS" ] || status=1
timeout 60 "$PY" scripts/gpu_bench.py --report "$RESULTS" || status=1
echo "total $(($(date +%s) - START))s"
exit $status
