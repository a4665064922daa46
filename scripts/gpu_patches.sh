#!/usr/bin/env bash
# Measure kernel patches against this tree in one GPU call. The lent machine's copy of the tree has
# no .git, so each patch (a `git format-patch` file, such as dev/unmerged/*.mbox) is applied with
# `patch`, the extension rebuilt incrementally in the editable install's CMake folder, measured,
# and the patched files restored before the next one:
#
#   bash scripts/gpu_patches.sh [build] PATCH.mbox ...
#
# `build` first builds this tree (scripts/gpu_check.sh build). Then, into $OUT/patches.log, for this
# tree and for each patch in turn:
#   PATCH_COMPARE  outputs against this tree's: run with --save FILE on the tree, --compare FILE on
#                  each patch (default: tools/projected_core_compare.py; empty: skipped)
#   PATCH_BENCH    the benchmark (default: benchmarks/projected_core_kernels.py --frames 64 256)
# and for each patch only:
#   PATCH_TESTS    pytest arguments (default: tests/test_projected_cuda_kernel.py -k sm90)
#   PATCH_SANITIZE scripts/sanitize_kernels.py's sections run under compute-sanitizer memcheck and
#                  racecheck (default: "projected sm90_cluster"; empty: skipped)
# A rebuild that leaves crosslmm_ops/_C*.so unchanged stops the run: whatever ran next would be the
# old module. A patch that touches no C++ (no source under csrc/, nor setup.py or CMakeLists.txt) is
# measured without a rebuild.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/patches.log"
PY="${PYTHON:-python3}"
PATCH_COMPARE="${PATCH_COMPARE-tools/projected_core_compare.py}"
PATCH_BENCH="${PATCH_BENCH-benchmarks/projected_core_kernels.py --frames 64 256}"
PATCH_TESTS="${PATCH_TESTS-tests/test_projected_cuda_kernel.py -k sm90}"
PATCH_SANITIZE="${PATCH_SANITIZE-projected sm90_cluster}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# C++ exceptions from the extension crash Python on the lent machines unless the toolchain's
# libstdc++ is preloaded (scripts/gpu_check.sh says more).
pre="$(g++ -print-file-name=libstdc++.so.6 2>/dev/null)"
[[ -f $pre ]] && export LD_PRELOAD="$pre"

if [[ ${1:-} == build ]]; then
  shift
  OUT="$OUT" bash scripts/gpu_check.sh build | tail -3
fi
BUILD_DIR="build/cmake-$($PY -c 'import sys; print(sys.implementation.cache_tag)')"
[[ -f $BUILD_DIR/CMakeCache.txt ]] || { echo "no $BUILD_DIR: run with 'build' first"; exit 1; }
module_sum() { cat crosslmm_ops/_C*.so | md5sum | cut -d' ' -f1; }
say() { echo "$*" | tee -a "$LOG"; }
rebuild() {  # rebuild [any]: with `any`, an unchanged module is no error
  local before; before="$(module_sum)"
  cmake --build "$BUILD_DIR" --parallel "${MAX_JOBS:-16}" > "$OUT/rebuild.log" 2>&1 \
    || { tail -20 "$OUT/rebuild.log"; return 1; }
  say "rebuilt $(grep -c 'Building' "$OUT/rebuild.log") files"
  [[ ${1:-} == any || "$(module_sum)" != "$before" ]] \
    || { say "STOP: the rebuild left _C unchanged"; exit 1; }
}
measure() {  # measure LABEL: the comparison and the benchmark
  if [[ -n $PATCH_COMPARE ]]; then
    local mode=--compare; [[ $1 == tree ]] && mode=--save
    $PY $PATCH_COMPARE $mode "$OUT/outputs_tree.pt" 2>&1 | grep -v Warn | tee -a "$LOG" | tail -3
  fi
  [[ -n $PATCH_BENCH ]] && $PY $PATCH_BENCH 2>&1 | grep -v Warn | tee -a "$LOG" | tail -6
}
check() {  # the tests and the sanitizers, on a patch
  [[ -n $PATCH_TESTS ]] && say "tests: $($PY -m pytest $PATCH_TESTS -q -p no:cacheprovider 2>&1 | tail -1)"
  [[ -z $PATCH_SANITIZE ]] && return
  for tool in memcheck racecheck; do
    CROSSLMM_SANITIZE_SECTIONS="$PATCH_SANITIZE" CROSSLMM_SANITIZE_TOOL=$tool \
      compute-sanitizer --tool $tool --error-exitcode 9 $PY scripts/sanitize_kernels.py \
      > "$OUT/sanitize_$tool.log" 2>&1
    say "$tool: exit $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log")"
  done
}

say "=== this tree ($(date +%T))"
measure tree
for p in "$@"; do
  say "=== $p ($(date +%T))"
  # The files it touches, saved so that it can be undone whole (patch -R cannot undo a series
  # whose commits touch one file twice).
  mapfile -t touched < <(grep -E '^\+\+\+ b/' "$p" | sed 's|^+++ b/||' | sort -u)
  saved="$(mktemp -d)"
  for f in "${touched[@]}"; do [[ -f $f ]] && install -D "$f" "$saved/$f"; done
  if patch -p1 -s --forward < "$p"; then
    # A patch that changes no C++ (Python and Triton only) leaves the module as it is.
    if printf '%s\n' "${touched[@]}" | grep -qE '^(csrc/.*\.(cu|cuh|h|hpp|cpp)|setup\.py|CMakeLists\.txt)$'; then
      rebuild && { measure patch; check; }
    else
      say "no C++ in this patch: no rebuild"; measure patch; check
    fi
  else
    say "does not apply"
  fi
  for f in "${touched[@]}"; do
    if [[ -f $saved/$f ]]; then cp "$saved/$f" "$f"; else rm -f "$f"; fi
  done
  rm -rf "$saved"
done
if [[ $# -gt 0 ]]; then
  say "=== this tree again"
  rebuild any
fi
