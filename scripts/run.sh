#!/usr/bin/env bash
# Sets up .venv (see scripts/setup_env.sh) and runs the main job: what is installed and which back
# ends each op can use, then token pooling of a synthetic SigLIP-shaped video on every back end.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
crosslmm-ops info
python python/pool_example.py "$@"
