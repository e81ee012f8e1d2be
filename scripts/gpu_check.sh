#!/usr/bin/env bash
# One prepared GPU check for a single-GPU machine (H100 / H200; no internet; PyTorch preinstalled).
#
#   bash scripts/gpu_check.sh            # from anywhere; runs in the repository root
#
# 1. installs the wheels in .whl/ (xformers, and the engine's dependencies a bare PyTorch image
#    lacks: simple-parsing, gguf, fastapi/uvicorn/pydantic for serve) into /tmp/site, nothing else
#    touched; without xformers its tests skip and the bench runs sdpa only. To bring them (on a
#    machine with pip access, in the repo root; .whl/ is git-ignored): scripts/gpu_wheels.sh,
#    then carry `.whl` to the GPU machine.
# 2. prints nvidia-smi, torch / CUDA / xformers versions and the xformers kernels available;
# 3. runs the GPU tests and the CPU attention-backend tests (pytest);
# 4. benchmarks a Mistral-7B-shaped bf16 model (random weights) at batch 1 and 8, eager, sdpa and
#    xformers, and prefill of a 2048-token prompt;
# 5. benchmarks CUDA graphs (torch.compile mode reduce-overhead) at batch 1 and 8;
# 6. runs the engine's commands on the GPU against CPU / eager (scripts/gpu_engine_check.py:
#    generate, serve with concurrent clients, 2 NCCL ranks on one GPU, --quantize, perplexity,
#    --compile), then benchmarks int4 / int8 weights and the engine's own --compile, as far as
#    the budget goes;
# 7. prints the results tables last (and whether batch 1 reaches --goal tok/s).
#
# STEPS="pytest engine bench_int4" runs only the steps named (pytest, bench_eager, bench_prefill,
# bench_cudagraphs, engine, bench_int4, bench_int8, bench_engine_compile), e.g. to spend a short
# device lease on what an earlier run did not reach.
# Every step has a timeout and the whole script stops within $BUDGET_S seconds (default 450);
# a step that fails or times out does not stop the later ones. Logs and results go to
# /tmp/gpu_check (and, when $OUT is set as on the device machine, into $OUT). Exit status: non-zero if the
# tests or an engine check failed, or if no benchmark row was produced.
set -euo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$((START + BUDGET_S))
PY=${PYTHON:-python3}
# The device tool returns at most 8 files from $OUT: logs go to one folder, packed into
# $OUT/logs.tar.gz on exit beside the two results files.
LOGS=/tmp/gpu_check
rm -rf "$LOGS"
mkdir -p "$LOGS"
RESULTS="$LOGS/bench.jsonl"
ENGINE="$LOGS/engine.jsonl"
if [ -n "${OUT:-}" ]; then
    trap 'tar czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null; cp -f "$RESULTS" "$ENGINE" "$OUT/" 2>/dev/null || true' EXIT
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0

say() { printf '\n=== [%3ds] %s\n' "$(($(date +%s) - START))" "$*"; }

# step CAP_SECONDS LOGNAME CMD...: run CMD with at most CAP seconds (less if the budget is short).
step() {
    local cap=$1 name=$2
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        say "skipped $name: not in STEPS ($STEPS)"
        return 0
    fi
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

say "wheels"
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        echo "installed ${#wheels[@]} wheels into /tmp/site: ${wheels[*]}"
    else
        echo "could not install ${wheels[*]}: going on without them"
    fi
else
    echo "no .whl/*.whl: xformers tests skip, the bench runs sdpa only (unless xformers is installed)"
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
for name in ("simple_parsing", "gguf", "fastapi", "uvicorn", "prometheus_client", "transformers", "httpx"):
    try:
        __import__(name)
    except Exception as e:
        print(f"{name}: not importable: {type(e).__name__}: {e}")
EOF
if "$PY" -c "import xformers" 2>/dev/null; then
    timeout 60 "$PY" -m xformers.info 2>&1 | grep -E "memory_efficient_attention\.|pytorch\.|gpu\.|build\.cuda" || true
fi

tests_rc=0
step 150 pytest "$PY" -m pytest tests/test_gpu.py tests/test_attention_backends.py -q -ra -p no:cacheprovider \
    || tests_rc=$?
((tests_rc != 0)) && status=1

step 100 bench_eager "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa xformers --compile none || true
step 45 bench_prefill "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa xformers --batch 1 \
    --prompt_len 2048 --new_tokens 4 || true
step 150 bench_cudagraphs "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa --compile cudagraphs || true
engine_rc=0
step 150 engine "$PY" scripts/gpu_engine_check.py --results "$ENGINE" \
    --budget $((DEADLINE - $(date +%s) - 25)) || engine_rc=$?
((engine_rc != 0)) && status=1
step 60 bench_int4 "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa --quantize int4 || true
step 60 bench_int8 "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa --quantize int8 --batch 1 || true
step 120 bench_engine_compile "$PY" scripts/gpu_bench.py --results "$RESULTS" --attention sdpa --compile engine \
    --batch 1 || true

# state NAME RC: what the summary says of a step
state() {
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $1 "* ]]; then
        echo "not run"
    elif [ "$2" = 0 ]; then
        echo passed
    else
        echo "FAILED, status $2"
    fi
}
say "summary (tests: $(state pytest $tests_rc); engine checks: $(state engine $engine_rc); logs in $LOGS)"
grep -E "passed|failed|error" "$LOGS/pytest.log" 2>/dev/null | tail -n 3 || true
[ -s "$RESULTS" ] || status=1
timeout 60 "$PY" scripts/gpu_engine_check.py --report "$ENGINE" || true
timeout 60 "$PY" scripts/gpu_bench.py --report "$RESULTS" || status=1
echo "total $(($(date +%s) - START))s"
exit $status
