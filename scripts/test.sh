#!/usr/bin/env bash
# Install meshplan with its test extras and run the test suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"          # CPU wheel first (a GPU machine: skip this, keep your build)
python -m pip install -q -e ".[test,report]" "triton==3.9.0"   # Triton kernels run under TRITON_INTERPRET=1
# Every test: the fast ones plain `pytest` runs (pyproject's addopts deselect `slow`) and the slow multi-process ones.
python -m pytest -q -p no:cacheprovider -m "slow or not slow" "$@"
# The full run (no arguments) also plans and reports the example matrix and checks every report is complete.
if [ $# -eq 0 ]; then
    python scripts/ci_reports.py --out build/ci-reports
fi
