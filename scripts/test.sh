#!/usr/bin/env bash
# Sets up .venv (see scripts/setup_env.sh) and runs the test suite. This is the README's test
# command and what CI runs (.ci/run). It compiles and links the CUDA extension wherever a CUDA
# toolkit is found, GPU or not, and the tests check it (CROSSLMM_EXPECT_EXTENSION). Tests marked
# `cuda` run only where a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
CROSSLMM_BUILD_DEFAULT=toolkit
. scripts/setup_env.sh
python -m pytest -q tests "$@"
