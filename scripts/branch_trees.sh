#!/usr/bin/env bash
# Test and time branches beside main in one GPU call: the lent machine gets a copy of the working
# tree without .git, so each branch travels as a diff against the checked-out tree and becomes a
# tree of its own there, built in place next to main's.
#
#   here:        bash scripts/branch_trees.sh prepare NAME=BRANCH[+BRANCH...] ...
#                  writes branch_diffs/NAME.diff (the branches' changes since HEAD, in order);
#                  branch_diffs/ is untracked and not ignored, so it travels; delete it after
#   GPU machine: bash scripts/branch_trees.sh build NAME ...
#                  gpu_br/NAME = this tree + branch_diffs/NAME.diff, each built for sm_90a in
#                  parallel with this tree (CUDA builds only where a diff touches csrc/ or setup;
#                  the others get this tree's extension), logs in $OUT/builds.log
#
# Then run anything in a tree with `cd gpu_br/NAME && PYTHONPATH=$PWD python3 ...`; gpu_br/ is
# ignored by git, so a later call on the same warm machine finds the trees and their builds.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}; shift || true

if [[ $mode == prepare ]]; then
  mkdir -p branch_diffs
  for spec in "$@"; do
    name=${spec%%=*}; branches=${spec#*=}
    : > "branch_diffs/$name.diff"
    for b in ${branches//+/ }; do
      # Each branch's own changes since it left HEAD, so two branches stack as two patches.
      git diff "$(git merge-base HEAD "$b")" "$b" >> "branch_diffs/$name.diff" || exit 1
    done
    echo "branch_diffs/$name.diff: $branches ($(wc -c < "branch_diffs/$name.diff") bytes)"
  done
  exit 0
fi

if [[ $mode != build ]]; then
  echo "usage: $0 prepare NAME=BRANCH[+BRANCH...] ... | build NAME ..." >&2
  exit 2
fi
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
root=$PWD
build() {  # build DIR LABEL: the extension in place, for sm_90a
  (cd "$1" && CROSSLMM_FORCE_BUILD=1 CROSSLMM_CUDA_ARCHS="${CROSSLMM_CUDA_ARCHS:-90a}" \
    MAX_JOBS="${MAX_JOBS:-7}" python3 setup.py build_ext --inplace > "/tmp/build_$2.log" 2>&1
   echo "build $2: exit $? at $(date +%T)")
}
build . main &
needs_build=()
for name in "$@"; do
  rm -rf "gpu_br/$name"; mkdir -p "gpu_br/$name"
  tar --exclude=./gpu_br --exclude=./.fa4 --exclude=./gpu_out --exclude=./build -cf - . \
    | tar -xf - -C "gpu_br/$name"
  (cd "gpu_br/$name" && if command -v patch > /dev/null; then patch -p1 -s < "$root/branch_diffs/$name.diff"
   else git apply "$root/branch_diffs/$name.diff"; fi) \
    || { echo "branch_trees: branch_diffs/$name.diff does not apply"; exit 1; }
  if grep -qE '^\+\+\+ b/(csrc/|setup.py|CMakeLists.txt)' "branch_diffs/$name.diff"; then
    needs_build+=("$name"); build "gpu_br/$name" "$name" &
  fi
done
wait
for label in main "${needs_build[@]}"; do
  { echo "== $label"; grep -iE "error" "/tmp/build_$label.log" | head -5; tail -2 "/tmp/build_$label.log"; }
done > "$OUT/builds.log"
grep -iE "error|^== " "$OUT/builds.log"
for name in "$@"; do
  [[ " ${needs_build[*]} " == *" $name "* ]] || cp crosslmm_ops/_C*.so "gpu_br/$name/crosslmm_ops/"
done
echo "branch_trees: ready: ${*/#/gpu_br/}"
