#!/usr/bin/env bash
# Wheels of what benchmarks/gpu_suite.sh needs and the lent GPU machine lacks (it reaches no package index):
#
#   bash benchmarks/gpu_suite_wheels.sh DIR        # default .whl (ignored by git: .git/info/exclude)
#
# pulp (meshplan's planner), liger-kernel (the kernel table), torchtitan 0.3.0 with what its model and
# parallelize code import (tyro, typeguard, docstring-parser, spmd_types), for CPython 3.12 on x86-64 Linux,
# without their dependencies: torch, triton, numpy and the rest are the machine's own.
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    "pulp==4.2.0" "liger-kernel==0.8.5" "torchtitan==0.3.0" "tyro==1.0.17" "typeguard>=4.0" \
    "docstring-parser==0.18.0" "spmd_types==0.2.3"
ls "$dir"
