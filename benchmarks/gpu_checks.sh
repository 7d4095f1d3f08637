#!/usr/bin/env bash
# Every check that needs a GPU, as one command for a lent single-GPU machine (H100/H200), about 7-9 minutes:
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [all|validate|kernels]
#
#   1. profile this GPU, validate its best single-GPU layouts (predicted vs
#      max_memory_allocated within 10%, step time within 15%)      -> OUT_DIR/validate.log, validate.json, cluster.yaml
#   2. the fused kernels compiled for this GPU: time and error against eager -> OUT_DIR/kernels.log, kernels.json
#
# Each step has its own time limit and a failure in one does not stop the next. meshplan must be importable
# (pip install -e . here; on a machine without package registries: rm -rf build DIR; pip install --no-index
# --no-deps --no-build-isolation --target DIR . and PYTHONPATH=DIR -- a fresh DIR and no build/, since pip
# leaves an existing target as it is and setuptools reuses build/). Knobs: MODEL (llama3.2-1b), SEQ (2048), BATCH (8), BUDGET (75s), TOP (4), STEPS (10),
# REPEATS (2).
set -u
out=$(realpath -m "${1:?usage: gpu_checks.sh OUT_DIR [all|validate|kernels]}")
what=${2:-all}
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d -t meshplan-gpu-XXXX)
# Run from a scratch folder: in the checkout's root, `python -m meshplan.cli` would import the checkout's
# meshplan/ folder (which holds neither profiler/ nor launcher/) instead of the installed package.
cd "$work"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$out/device.txt"

if [ "$what" != kernels ]; then
begin=$(date +%s)
timeout 380 $py "$repo"/benchmarks/profile_validate_gpu.py --out-dir "$work/pv" --model "${MODEL:-llama3.2-1b}" \
    --seq-len "${SEQ:-2048}" --global-batch "${BATCH:-8}" --budget "${BUDGET:-75s}" --top "${TOP:-4}" \
    --steps "${STEPS:-10}" --repeats "${REPEATS:-2}" >"$out/validate.log" 2>&1
echo "profile + validate: exit $? after $(( $(date +%s) - begin ))s" | tee -a "$out/validate.log"
for f in cluster.yaml validate.json; do cp "$work/pv/$f" "$out/" 2>/dev/null; done
# the end of each layout's first run log (validate keeps every run's output in its work dir)
tail -n 25 "$work"/pv/runs/plan*.run0.log > "$out/run-logs-tail.txt" 2>/dev/null
tail -n 40 "$out/validate.log"
fi

if [ "$what" != validate ]; then
begin=$(date +%s)
timeout 150 $py "$repo"/benchmarks/bench_kernels_gpu.py --reps 10 --json "$out/kernels.json" >"$out/kernels.log" 2>&1
echo "kernels: exit $? after $(( $(date +%s) - begin ))s" | tee -a "$out/kernels.log"
cat "$out/kernels.log"
fi
