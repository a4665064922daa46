# Sourced by scripts/test.sh and scripts/run.sh: creates (or reuses) the virtual environment
# $VENV (default .venv), installs torch ($TORCH_SPEC, default torch==2.14.1: a CUDA 13 build), the
# build tools, and this package in editable mode with its test extras. The CUDA extension is built
# whenever a CUDA toolkit is found (CUDA_HOME, /usr/local/cuda, or the nvcc on PATH), GPU or not;
# CROSSLMM_CUDA_ARCHS picks the targets (default 80;90a).
set -euo pipefail
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "== installing $TORCH_SPEC and build tools into $VENV"
python -m pip install -q "$TORCH_SPEC" "cmake>=3.24" ninja 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] || [[ -x /usr/local/cuda/bin/nvcc ]] || command -v nvcc >/dev/null; then
  export CROSSLMM_FORCE_BUILD="${CROSSLMM_FORCE_BUILD:-1}"
  export CROSSLMM_EXPECT_EXTENSION="${CROSSLMM_EXPECT_EXTENSION:-1}"
fi
echo "== installing crosslmm-ops (CUDA extension: ${CROSSLMM_FORCE_BUILD:-0})"
python -m pip install -q --no-build-isolation -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import crosslmm_ops" || { echo "crosslmm-ops failed to install"; exit 1; }
