#!/usr/bin/env bash
# Sets up .venv (see scripts/setup_env.sh) and runs the main job: what is installed and which back
# ends each op can use, then `crosslmm-ops demo` - a small CrossLMM against a LLaVA-OneVision-shaped
# baseline on a synthetic video (CPU, about a minute; arguments are passed on, e.g.
# `bash scripts/run.sh --preset crosslmm-2b --frames 256 --device cuda` on a GPU).
# The CUDA extension is compiled only where a GPU is present (CROSSLMM_BUILD_EXTENSION=1 compiles
# it anyway): elsewhere it could not run, and compiling it would be most of a first run's time.
# The demo needs none of the test extras either.
set -euo pipefail
cd "$(dirname "$0")/.."
CROSSLMM_BUILD_DEFAULT=gpu
CROSSLMM_EXTRAS="${CROSSLMM_EXTRAS-}"
. scripts/setup_env.sh
crosslmm-ops info
crosslmm-ops demo "$@"
