#!/usr/bin/env bash
# meshplan's runtime on one GPU, as one command (under 8 minutes on an H100):
#
#   bash benchmarks/gpu_suite.sh OUT_DIR
#
#   1. launch      the planner's first choice for llama3.2-1b, seq 8192, global batch 8 on localhost:1 (the
#                  quick profile of this GPU included: its kernel table picks meshplan's or liger-kernel's
#                  kernel per op), trained 30 steps by `meshplan launch`
#                  -> OUT_DIR/plan.yaml, launch.jsonl, launch.log
#   2. torchtitan  the same model, batch, sequence and recompute in torchtitan's model code and parallelize_llama
#                  (benchmarks/bench_torchtitan.py), where torchtitan runs with this machine's torch
#                  -> OUT_DIR/titan.json, titan.log
#   3. kernels     eager / torch.compile / meshplan's Triton / liger-kernel, forward + backward, at Llama 3 8B
#                  and 70B widths (benchmarks/bench_kernels_gpu.py) -> OUT_DIR/kernels-8b.json, kernels-70b.json
#   4. moe         an MoE MLP's routed experts, grouped GEMMs against one GEMM per expert, next to the planner's
#                  price (benchmarks/bench_moe_gpu.py: Mixtral 8x7B, Qwen3-30B-A3B) -> OUT_DIR/moe.json
#   then benchmarks/gpu_suite_report.py: OUT_DIR/suite.json (the results page's format) and suite.md.
#
# Packages the GPU machine lacks travel as wheels: `bash benchmarks/gpu_suite_wheels.sh .whl` where pip reaches
# PyPI, carry .whl; this script installs WHEELS (default .whl) when it exists. meshplan itself is installed from
# the checkout into a scratch folder (pip --target), since the checkout's root is not an importable package.
# Each step has its own time limit; a failure in one does not stop the next. Knobs: STEPS (30), SEQ (8192),
# BATCH (8), MODEL (llama3.2-1b).
set -u
out=$(realpath -m "${1:?usage: gpu_suite.sh OUT_DIR}")
mkdir -p "$out"
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
site=$(mktemp -d -t meshplan-site-XXXX)
wheels=${WHEELS:-$repo/.whl}
if [ -d "$wheels" ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
fi
rm -rf "$repo/build"
$py -m pip install -q --no-index --no-deps --no-build-isolation --target "$site/mp" "$repo" >"$out/install.log" 2>&1 \
    || { echo "gpu_suite: installing meshplan failed (see $out/install.log)"; exit 1; }
export PYTHONPATH="$site/mp:$site${PYTHONPATH:+:$PYTHONPATH}"
work=$(mktemp -d -t meshplan-gpu-suite-XXXX)
cd "$work"       # not the checkout's root, whose meshplan/ folder would shadow the installed package

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"

begin=$(date +%s)
timeout 150 $py -m meshplan.cli plan --model "${MODEL:-llama3.2-1b}" --cluster localhost:1 --global-batch "${BATCH:-8}" \
    --seq-len "${SEQ:-8192}" --precision bf16 --out "$out/plan.yaml" >"$out/launch.log" 2>&1 \
 && timeout 180 $py -m meshplan.launcher "$out/plan.yaml" --steps "${STEPS:-30}" --metrics-out "$out/launch.jsonl" \
    >>"$out/launch.log" 2>&1
status=$?
if [ $status -ne 0 ] && [ -f "$out/plan.yaml" ] && grep -q ": liger$" "$out/plan.yaml"; then
    # the profile chose liger-kernel for some op and the launch failed: keep that log, train with meshplan's
    # own kernels so that the step is still measured (the report says so)
    mv "$out/launch.log" "$out/launch-liger.log"
    cp "$out/plan.yaml" "$out/plan-liger.yaml"
    sed -i 's/: liger$/: fused/' "$out/plan.yaml"
    echo "launch with liger-kernel failed (exit $status, launch-liger.log); again with kernels fused" \
        | tee "$out/launch.log"
    timeout 150 $py -m meshplan.launcher "$out/plan.yaml" --steps "${STEPS:-30}" --metrics-out "$out/launch.jsonl" \
        >>"$out/launch.log" 2>&1
    status=$?
fi
echo "launch: exit $status after $(( $(date +%s) - begin ))s" | tee -a "$out/launch.log"
tail -n 20 "$out/launch.log"

begin=$(date +%s)
timeout 120 $py "$repo"/benchmarks/bench_torchtitan.py --plan "$out/plan.yaml" --steps "${STEPS:-30}" \
    --json "$out/titan.json" >"$out/titan.log" 2>&1
echo "torchtitan: exit $? after $(( $(date +%s) - begin ))s" | tee -a "$out/titan.log"
tail -n 15 "$out/titan.log"

for shapes in 8b 70b; do
    begin=$(date +%s)
    timeout 60 $py "$repo"/benchmarks/bench_kernels_gpu.py --shapes "llama3-$shapes" --reps 10 \
        --json "$out/kernels-$shapes.json" >"$out/kernels-$shapes.log" 2>&1
    echo "kernels $shapes: exit $? after $(( $(date +%s) - begin ))s" | tee -a "$out/kernels-$shapes.log"
done

begin=$(date +%s)
timeout 90 $py "$repo"/benchmarks/bench_moe_gpu.py --json "$out/moe.json" >"$out/moe.log" 2>&1
echo "moe experts: exit $? after $(( $(date +%s) - begin ))s" | tee -a "$out/moe.log"

$py "$repo"/benchmarks/gpu_suite_report.py "$out" | tee "$out/suite.md"
