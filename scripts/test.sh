#!/usr/bin/env bash
# Install meshplan with its test extras and run the test suite (the README's second command).
#   bash scripts/test.sh            every test: the fast ones on two workers, then the slow ones one at a time
#   bash scripts/test.sh ARGS...    pytest ARGS, slow tests included (e.g. a file, -k, -x)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"          # CPU wheel first (a GPU machine: skip this, keep your build)
# meshplan with its test extras, Triton and liger-kernel (their kernels run under TRITON_INTERPRET=1), and what torchtitan's own
# command-line parser imports (tests/test_export_torchtitan.py: its ConfigManager and llama3 config registry), in
# one resolver call so that transformers and datasets agree on huggingface-hub; then torchtitan and torchdata
# with --no-deps (nothing may replace the torch above).
python -m pip install -q -e ".[test,report]" "triton==3.9.0" "liger-kernel==0.8.5" \
    "tyro>=1.0" "spmd_types==0.2.3" "tokenizers>=0.15" "datasets>=3.6,<4.8" "tensorboard>=2.15"
python -m pip install -q --no-deps "torchtitan==0.3.0" "torchdata==0.11.0"
if [ $# -gt 0 ]; then
    exec python -m pytest -q -p no:cacheprovider -m "slow or not slow" "$@"
fi
# Every test but those that assert on wall-clock time or bandwidth on two pytest-xdist workers (the tests that
# share a torchrun job kept on one worker: tests/conftest.py), then those (marked `alone`) by themselves.
python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup -m "not alone" --durations=25
python -m pytest -q -p no:cacheprovider -m alone --durations=10
