#!/usr/bin/env bash
# A new user's install: build the wheel, install it in a fresh virtual environment with no extras (so no
# Triton, no matplotlib), import every module, and run the commands a newcomer runs first. Each must exit 0
# and print no traceback or library warning.
#   bash scripts/check_wheel.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${1:-$(mktemp -d -t meshplan-wheel-XXXXXX)}
mkdir -p "$WORK"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
quiet() {   # run an install step; show its output only when it fails
    "$@" >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; echo "check_wheel: FAILED: $*"; exit 1; }
}
# build from a copy of the source, so no build/ folder of an earlier build is reused or left in the checkout
mkdir -p "$WORK/src"
tar --exclude=./.git --exclude=./build --exclude='*.egg-info' -cf - . | tar -xf - -C "$WORK/src"
quiet python -m pip wheel --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
quiet python -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
quiet "$PY" -m pip install "torch==2.13.0"     # the CPU build, as the README's install
quiet "$PY" -m pip install "$WORK"/dist/meshplan-*.whl
MESHPLAN="$WORK/venv/bin/meshplan"
export MESHPLAN_CACHE_DIR="$WORK/cache"     # an empty cache: the first plan on localhost measures this machine

echo "check_wheel: importing every module of the installed package"
(cd "$WORK" && "$PY" - <<'EOF'
import importlib, pkgutil, sys
import meshplan
if "site-packages" not in meshplan.__file__:
    sys.exit(f"check_wheel: imported meshplan from {meshplan.__file__}, not from the installed wheel")
# modules that exist only for an optional extra (tests/test_dependencies.py lists them too)
EXTRA_ONLY = {"meshplan.launcher.runtime.kernels.triton_kernels"}
names = [m.name for m in pkgutil.walk_packages(meshplan.__path__, "meshplan.")]
for name in names:
    if name not in EXTRA_ONLY:
        importlib.import_module(name)
for missing in ("triton", "matplotlib"):
    try:
        importlib.import_module(missing)
    except ImportError:
        continue
    sys.exit(f"check_wheel: {missing} is installed in the fresh environment; it must stay optional")
print(f"check_wheel: imported {len(names) - len(EXTRA_ONLY)} modules")
EOF
)

run() {   # run a command in $WORK; fail on a non-zero exit, a traceback or a Python warning in its output
    echo "check_wheel: $*"
    local log="$WORK/last.log"
    if ! (cd "$WORK" && "$@") >"$log" 2>&1; then
        cat "$log"; echo "check_wheel: FAILED (exit): $*"; exit 1
    fi
    if grep -nE "Traceback|Warning:|warnings.warn" "$log"; then
        cat "$log"; echo "check_wheel: FAILED (traceback or warning in the output): $*"; exit 1
    fi
}

run "$MESHPLAN" plan
run "$MESHPLAN" plan --model tiny-llama --cluster localhost:2 --global-batch 4 --seq-len 32 --precision fp32 \
    --out t.yaml
run "$MESHPLAN" launch t.yaml --steps 2
run "$MESHPLAN" launch t.yaml --dry-run
run "$MESHPLAN" launch t.yaml --emit slurm
run "$MESHPLAN" plan --model llama3-405b --cluster dgx-h100:2048 --global-batch 2048 --seq-len 8192 \
    --fix tp=8 --fix pp=16 --fix dp=128 --out 405b.yaml
run "$MESHPLAN" check 405b.yaml --ranks 0,last --format json
# the first and the last pipeline rank of 16,384, built and run on fake tensors in one process, within a minute
"$PY" - "$WORK/last.log" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
report = json.loads(text[text.index("{"):text.rindex("}") + 1])
seconds = sum(r["seconds"] for r in report["ranks"])
assert report["world_size"] == 16384 and [r["rank"] for r in report["ranks"]] == [0, 16383], report["ranks"]
assert {r["coords"]["pp"] for r in report["ranks"]} == {0, 15}, report["ranks"]
assert all(r["measured_gib"]["parameters"] > 0 and r["predicted_gib"]["peak"] > 0 for r in report["ranks"])
assert seconds < 60, f"two ranks of the 405B plan took {seconds:.0f}s to check"
print(f"check_wheel: 405B ranks 0 and 16383 checked in {seconds:.0f}s, fits: {report['fits']}")
EOF
echo "check_wheel: all passed ($WORK)"
