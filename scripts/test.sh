#!/usr/bin/env bash
# Sets up .venv (see scripts/setup_env.sh) and runs the test suite. This is the README's test
# command and exactly what CI runs (.ci/run). Tests marked `cuda` run only where a GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
python -m pytest -q tests "$@"
