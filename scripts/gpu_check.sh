#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (CUDA toolkit, torch with CUDA and
# Triton already installed, no network needed):
#
#   scripts/gpu_check.sh OUT_DIR
#
# 1. builds the extension with the CUDA kernels for the local GPU only (e.g. sm_90)
#    and installs it into the current Python (no dependencies fetched);
# 2. runs the GPU test subset (ops, optim, models, backend; the tokenizer and CLI
#    tests are CPU-only and run in CI): Triton kernels are compiled for real (no
#    interpreter), the CUDA C++ kernels run, torch.compile sees the ops;
# 3. runs `turbotune bench --quick`;
# 4. writes logs and JSON under OUT_DIR and prints a short table last.
# Budget: under 8 minutes on one H200 (each step has its own timeout: 100 + 240 + 120 s).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET TURBOTUNE_BACKEND

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)" | tee -a "$OUT/summary.txt"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
ARCH=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')") || { echo "no CUDA device visible to torch"; exit 1; }
echo "compute capability sm_$ARCH" | tee -a "$OUT/summary.txt"

step "build (TURBOTUNE_CUDA=ON, sm_$ARCH)"
t0=$(date +%s)
TURBOTUNE_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real" \
  timeout 100 $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - t0 ))s (log: build.log)" | tee -a "$OUT/summary.txt"
[ $build_rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

step "turbotune info"
(cd "$OUT" && $PY -m turbotune info) > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

step "tests on the GPU"
t0=$(date +%s)
timeout 240 $PY -m pytest tests/ops tests/optim tests/models tests/test_backend.py -q -p no:cacheprovider --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
echo "tests rc=$test_rc in $(( $(date +%s) - t0 ))s: $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 | tee -a "$OUT/summary.txt"

step "product GPU tests (finetune / bench timing on CUDA)"
timeout 120 $PY -m pytest tests/cli tests/bench -m gpu -q -p no:cacheprovider > "$OUT/tests_product.log" 2>&1
echo "product gpu tests rc=$?: $(tail -1 "$OUT/tests_product.log")" | tee -a "$OUT/summary.txt"

step "turbotune bench --quick"
t0=$(date +%s)
(cd "$OUT" && timeout 120 $PY -m turbotune bench --quick --no-progress --out "$OUT/bench") > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc in $(( $(date +%s) - t0 ))s (bench/bench.json, bench/bench.md)" | tee -a "$OUT/summary.txt"

step "summary: turbotune vs torch (median-time ratio, > 1 = faster)"
$PY - "$OUT/bench/bench.json" <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as exc:
    print(f"no bench results ({exc})"); sys.exit(0)
print(f"{'op':<16} {'provider':<14} {'mode':<8} {'shape':<18} {'dtype':<9} {'p50 ms':>9} {'vs torch':>9}")
for r in rows:
    if r["baseline"]:
        continue
    ratio = "-" if r["ratio_vs_torch"] is None else f"{r['ratio_vs_torch']:.2f}x"
    print(f"{r['op']:<16} {r['provider']:<14} {r['mode']:<8} {r['shape']:<18} {r['dtype']:<9} {r['p50']:>9.4f} {ratio:>9}")
PYEOF
[ $test_rc -eq 0 ] && [ $bench_rc -eq 0 ]
