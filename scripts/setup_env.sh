# Sourced by scripts/test.sh and scripts/run.sh: creates (or reuses) the virtual environment
# $VENV (default .venv), installs torch ($TORCH_SPEC, default torch==2.14.1: a CUDA 13 build), the
# build tools, and this package in editable mode with the extras in $CROSSLMM_EXTRAS (default
# "test"; empty for none).
#
# Whether the CUDA extension is compiled: CROSSLMM_BUILD_EXTENSION, else the calling script's
# CROSSLMM_BUILD_DEFAULT, else "toolkit" (CROSSLMM_SKIP_CUDA_BUILD=1 alone means 0):
#   toolkit  wherever a CUDA toolkit is found (CUDA_HOME, /usr/local/cuda, or the nvcc on PATH),
#            GPU or not; it must then compile and link (the test command and CI)
#   gpu      only where a GPU is present as well (the main job: without a GPU the extension
#            cannot run, and compiling it would be most of a first run's time)
#   1        always; a missing toolchain is an error
#   0        never (a pure-Python install: the Triton and torch back ends)
# An extension built earlier in this checkout stays importable when a later install skips it.
# CROSSLMM_SETUP_PLAN_ONLY=1 prints the decision and exits (the calling script too) before
# installing anything.
# CROSSLMM_CUDA_ARCHS picks the targets (default 80;90a).
set -euo pipefail
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
CROSSLMM_EXTRAS="${CROSSLMM_EXTRAS-test}"

crosslmm_has_toolkit() {
  [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || [[ -x /usr/local/cuda/bin/nvcc ]] \
    || command -v nvcc >/dev/null
}
crosslmm_has_gpu() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>/dev/null | grep -q '^GPU '
  else
    compgen -G '/dev/nvidia[0-9]*' >/dev/null
  fi
}
if [[ -z "${CROSSLMM_BUILD_EXTENSION:-}" && "${CROSSLMM_SKIP_CUDA_BUILD:-0}" == 1 ]]; then
  CROSSLMM_BUILD_EXTENSION=0
fi
CROSSLMM_BUILD_EXTENSION="${CROSSLMM_BUILD_EXTENSION:-${CROSSLMM_BUILD_DEFAULT:-toolkit}}"
case "$CROSSLMM_BUILD_EXTENSION" in
  toolkit) if crosslmm_has_toolkit; then build=1; why="a CUDA toolkit is present"
           else build=0; why="no CUDA toolkit found"; fi ;;
  gpu) if ! crosslmm_has_gpu; then build=0; why="no GPU found"
       elif ! crosslmm_has_toolkit; then build=0; why="a GPU but no CUDA toolkit found"
       else build=1; why="a GPU and a CUDA toolkit are present"; fi ;;
  1) build=1; why="asked for" ;;
  0) build=0; why="asked for" ;;
  *) echo "CROSSLMM_BUILD_EXTENSION must be toolkit, gpu, 1 or 0," \
          "got '$CROSSLMM_BUILD_EXTENSION'" >&2
     exit 2 ;;
esac
if [[ $build == 1 ]]; then
  # setup.py: a toolchain that cannot build is an error, not a silent pure-Python install; the
  # tests then check that the extension imports, for the archs it was built for.
  export CROSSLMM_FORCE_BUILD=1 CROSSLMM_EXPECT_EXTENSION="${CROSSLMM_EXPECT_EXTENSION:-1}"
  unset CROSSLMM_SKIP_CUDA_BUILD
  echo "== CUDA extension: compiled ($why; CROSSLMM_BUILD_EXTENSION=$CROSSLMM_BUILD_EXTENSION)"
else
  export CROSSLMM_SKIP_CUDA_BUILD=1
  unset CROSSLMM_FORCE_BUILD
  echo "== CUDA extension: not compiled ($why;" \
       "CROSSLMM_BUILD_EXTENSION=$CROSSLMM_BUILD_EXTENSION; CROSSLMM_BUILD_EXTENSION=1 compiles it)"
fi
if [[ "${CROSSLMM_SETUP_PLAN_ONLY:-0}" == 1 ]]; then
  exit 0
fi

# pip, without the find-links warnings some machines print, keeping pip's exit status (a failed
# build must stop here, not leave an older install in place).
crosslmm_pip() {
  local log rc=0
  log="$(mktemp)"
  python -m pip "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  return "$rc"
}

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "== installing $TORCH_SPEC and build tools into $VENV"
# setuptools >= 77 for pyproject's licence metadata: --no-build-isolation builds with the venv's.
crosslmm_pip install -q "$TORCH_SPEC" "setuptools>=77" "cmake>=3.24" ninja
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
spec="."
[[ -n "$CROSSLMM_EXTRAS" ]] && spec=".[$CROSSLMM_EXTRAS]"
echo "== installing crosslmm-ops ($spec)"
crosslmm_pip install -q --no-build-isolation -e "$spec"
python -c "import crosslmm_ops, transformers; print('crosslmm-ops', crosslmm_ops.__version__, \
'with transformers', transformers.__version__)"
