#!/usr/bin/env bash
# Build, test, sanitize and benchmark on a GPU machine in one go (what the lent H100 runs):
#
#   bash scripts/gpu_check.sh [build] [test] [fuzz] [sanitize] [bench] [bench-attention]
#                             [bench-projected] [peers] [paths] [profile] [probe-sm90] [probe-triton]
#                             [efficiency] [demo]
#                             (default: build test sanitize bench)
#
# Logs and results go to $OUT (default ./gpu_out): gpu_tests.log, sanitizer.log, bench.log and the
# benchmark JSON files. A short summary is printed last. GPU_TEST_TIMEOUT (default 1500 s) and
# SANITIZE_TIMEOUT (900 s per tool) kill a run that hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STAGES="${*:-build test sanitize bench}"
export MAX_JOBS="${MAX_JOBS:-16}" CROSSLMM_CUDA_ARCHS="${CROSSLMM_CUDA_ARCHS:-90a}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Output reaches the logs as it is written, so a run killed for a hang still shows how far it got.
export PYTHONUNBUFFERED=1
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
step() { echo; echo "=== $* ($(date +%T))"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
# The lent GPU machine has no internet: test-only packages it lacks (hypothesis, matplotlib) can be
# brought as wheels in gpu_wheels/ (pip download on a connected machine; see the README).
if [[ -d gpu_wheels ]]; then
  $PY -m pip install -q --no-index --find-links gpu_wheels hypothesis matplotlib > "$OUT/wheels.log" 2>&1 \
    || { echo "installing gpu_wheels failed:"; tail -5 "$OUT/wheels.log"; }
fi

if has build; then
  step "build (archs $CROSSLMM_CUDA_ARCHS, $MAX_JOBS jobs)"
  t0=$SECONDS
  CROSSLMM_FORCE_BUILD=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
    > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
  grep -E "warning|error" "$OUT/build.log" | grep -v "^WARNING: Location" | head -20
  echo "built in $((SECONDS - t0)) s"
  $PY -m crosslmm_ops.cli info
fi

if has test; then
  step "errors from the extension"
  # A failed check inside the extension must come back as a Python RuntimeError. On the lent
  # H100/H200 image the interpreter crashed instead, for any C++ exception the extension threw,
  # unless the toolchain's libstdc++ was preloaded (tools/diag_throw.sh shows the experiment):
  # the process there mixes two C++ runtimes. Detect that, say so, and run the tests preloaded.
  if $PY scripts/check_errors.py > "$OUT/check_errors.log" 2>&1; then
    tail -3 "$OUT/check_errors.log"
  else
    pre="$(g++ -print-file-name=libstdc++.so.6)"
    if LD_PRELOAD="$pre" $PY scripts/check_errors.py > "$OUT/check_errors.log" 2>&1; then
      echo "ENVIRONMENT: C++ exceptions from the extension crash Python here unless libstdc++ is"
      echo "preloaded; running the GPU tests with LD_PRELOAD=$pre"
      export LD_PRELOAD="$pre"
    else
      echo "check_errors FAILED even with libstdc++ preloaded:"; tail -20 "$OUT/check_errors.log"
      status=1
    fi
  fi
  step "GPU tests"
  # A kernel that hangs is killed after GPU_TEST_TIMEOUT seconds (exit 137), not left to eat the
  # machine's time.
  timeout -s KILL "${GPU_TEST_TIMEOUT:-1500}" \
    $PY -m pytest tests -m cuda -q --maxfail="${MAXFAIL:-25}" -p no:cacheprovider ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
  rc=$?; [[ $rc -ne 0 ]] && status=1
  [[ $rc -eq 137 ]] && echo "GPU tests: killed after ${GPU_TEST_TIMEOUT:-1500} s (a hang?); the log shows how far they got"
  grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -40; tail -3 "$OUT/gpu_tests.log"
fi

if has sanitize; then
  step "compute-sanitizer"
  : > "$OUT/sanitizer.log"
  for tool in memcheck racecheck initcheck; do
    # initcheck only sees reads of memory never written since cudaMalloc: with torch's caching
    # allocator a block reused from an earlier tensor looks initialised, so it runs without it.
    # (torch reads the variable's presence in some versions, so it is set only for initcheck).
    nocache=(); [[ $tool == initcheck ]] && nocache=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    # (sanitize_kernels.py reads CROSSLMM_SANITIZE_TOOL: it skips the one section whose reports
    # under initcheck and racecheck are all inside cuBLAS.)
    env CROSSLMM_SANITIZE_TOOL="$tool" "${nocache[@]}" \
      timeout -s KILL "${SANITIZE_TIMEOUT:-900}" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 --target-processes all \
      $PY scripts/sanitize_kernels.py >> "$OUT/sanitizer.log" 2>&1
    rc=$?; echo "$tool: exit $rc"; [[ $rc -ne 0 ]] && status=1
  done
  grep -E "ERROR SUMMARY|kernels run" "$OUT/sanitizer.log"
fi

if has bench; then
  step "benchmarks: token pooling"
  CROSSLMM_BENCH_DIR="$OUT" $PY -m pytest benchmarks/bench_token_pool.py --benchmark-only -q \
    -p no:cacheprovider --benchmark-columns=median,rounds > "$OUT/bench.log" 2>&1 || status=1
  sed -n '/results written/,$p' "$OUT/bench.log" | head -80
fi

run_bench() {  # run_bench <file> <log>: one pytest-benchmark file, its summary table printed
  step "benchmarks: $1"
  CROSSLMM_BENCH_DIR="$OUT" $PY -m pytest "$1" --benchmark-only -q \
    -p no:cacheprovider --benchmark-columns=median,rounds > "$OUT/$2" 2>&1 || status=1
  sed -n '/results written/,$p' "$OUT/$2" | head -80
  grep -E "^(FAILED|ERROR)" "$OUT/$2" | head -20
}
has bench-attention && run_bench benchmarks/bench_cross_attention.py bench_attention.log
has bench-projected && [[ -f benchmarks/bench_projected_attention.py ]] && \
  run_bench benchmarks/bench_projected_attention.py bench_projected.log

if has paths; then
  step "projected_cross_attention: auto's path against the faster one, and the cost model's fit"
  $PY benchmarks/projected_paths.py --out "$OUT/projected_paths.json" > "$OUT/paths.log" 2>&1 || status=1
  tail -30 "$OUT/paths.log"
fi

if has peers; then
  # The peer table of docs/performance.md (FlashAttention-4's column when flash_attn.cute imports).
  step "peers: ours against FA4, SDPA cuDNN and SDPA flash"
  $PY benchmarks/peers.py --out "$OUT/peers_h100.json" > "$OUT/peers.log" 2>&1 || status=1
  tail -30 "$OUT/peers.log"
fi

if has profile; then
  step "kernel profile and pooling probe (tools/)"
  $PY tools/kernel_profile.py 2>&1 | tail -80 || status=1
  $PY tools/pool_probe.py --json "$OUT/pool_probe.json" 2>&1 | tail -10 || status=1
fi

if has fuzz; then
  # Hypothesis tests at a modest count (bounded by a timeout, so the campaign below always runs),
  # then the time-bounded campaign over every op, back end and module (scripts/fuzz_campaign.py;
  # its report is written even when it is cut short).
  step "fuzz tests (${FUZZ_EXAMPLES:-40} examples per test, at most ${FUZZ_TEST_TIMEOUT:-240} s)"
  CROSSLMM_FUZZ_EXAMPLES="${FUZZ_EXAMPLES:-40}" CROSSLMM_FUZZ_REPORT="$OUT/fuzz_gpu.json" \
    timeout "${FUZZ_TEST_TIMEOUT:-240}" $PY -m pytest tests/test_fuzz.py -q -p no:cacheprovider \
    > "$OUT/fuzz.log" 2>&1
  rc=$?; [[ $rc -ne 0 ]] && status=1; [[ $rc -eq 124 ]] && echo "fuzz tests: cut by the timeout"
  grep -E "^(FAILED|ERROR)" "$OUT/fuzz.log" | head -20; tail -2 "$OUT/fuzz.log"
  step "fuzz campaign (${FUZZ_SECONDS:-240} s)"
  timeout -s TERM "$(( ${FUZZ_SECONDS:-240} + 60 ))" $PY scripts/fuzz_campaign.py --device cuda \
    --seconds "${FUZZ_SECONDS:-240}" --out "$OUT/fuzz_campaign_h100.json" > "$OUT/fuzz_campaign.log" 2>&1
  rc=$?; [[ $rc -ne 0 ]] && status=1
  grep -E "^FAIL" "$OUT/fuzz_campaign.log" | head -20; tail -3 "$OUT/fuzz_campaign.log"
fi

if has demo; then
  step "crosslmm-ops demo at the paper's scale"
  $PY -m crosslmm_ops.cli demo --preset crosslmm-2b --frames "${DEMO_FRAMES:-64}" --device cuda \
    --quiet 2>&1 | tail -20 || status=1
fi

if has efficiency; then
  step "efficiency study (${EFF_ARGS:-default presets and lengths})"
  $PY benchmarks/efficiency.py --out "$OUT" ${EFF_ARGS:-} > "$OUT/efficiency.log" 2>&1 || status=1
  grep -E "^\[(oom|flops)\]" "$OUT/efficiency.log"; sed -n '/^| preset/,$p' "$OUT/efficiency.log" | head -40
  grep -E "Error|Traceback" "$OUT/efficiency.log" | head -5
fi

if has probe-sm90; then
  for direction in forward backward; do
    step "sm90 attention probe: $direction"
    $PY benchmarks/sm90_probe.py --direction "$direction" --json "$OUT/sm90_probe_$direction.json" \
      2>&1 | tail -40 || status=1
  done
fi
if has probe-triton; then
  # The Triton forward (and with --cuda-splits the CUDA one) at explicit launch options on the rows
  # where Triton trails CUDA: checks both split models (tools/triton_forward_probe.py).
  step "Triton forward probe"
  $PY tools/triton_forward_probe.py --cuda-splits --json "$OUT/triton_forward_probe.json" 2>&1 \
    | grep -v Warning | tail -30 || status=1
fi
echo; echo "gpu_check: exit $status"
exit $status
