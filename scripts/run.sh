#!/usr/bin/env bash
# Sets up .venv (see scripts/setup_env.sh) and runs the main job: what is installed and which back
# ends each op can use, then `crosslmm-ops demo` - a small CrossLMM against a LLaVA-OneVision-shaped
# baseline on a synthetic video (CPU, about a minute; arguments are passed on, e.g.
# `bash scripts/run.sh --preset crosslmm-2b --frames 256 --device cuda` on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
crosslmm-ops info
crosslmm-ops demo "$@"
