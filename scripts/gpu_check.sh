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
# 3. runs the optimizer's CUDA tests on their own, one summary line per test
#    (tests/optim/test_adamw_cuda.py: CUDA AdamW vs the CPU kernel and torch, shared
#    stochastic-rounding bits, master copy moved with the model, grads unscaled in
#    place under GradScaler, found_inf summed over devices, amsgrad NaN, zero-element
#    params, clipping fused into the step with no host synchronisation);
# 4. runs `turbotune bench --quick`;
# 5. row ops (LayerNorm / bias+GELU / cross-entropy) vs torch and the LayerNorm
#    backward launch-plan sweep;
# 6. checks the CNN goals (benchmarks/bench_cnn.py --goals: paired rounds, bf16);
# 7. writes logs and JSON under OUT_DIR and prints a short table last.
# Each step has its own timeout (seconds): 100 + 200 + 60 + 120 + 150 + 150.
# 3. runs `turbotune bench --quick`;
# 4. writes logs and JSON under OUT_DIR and prints a short table last.
# Budget: under 10 minutes on one H200 (each step has its own timeout: 100 + 240 + 360 + 120 s).
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
timeout 200 $PY -m pytest tests/ops tests/optim tests/models tests/test_backend.py -q -p no:cacheprovider \
  --ignore=tests/optim/test_adamw_cuda.py --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
echo "tests rc=$test_rc in $(( $(date +%s) - t0 ))s: $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 | tee -a "$OUT/summary.txt"

step "optimizer CUDA kernels (tests/optim/test_adamw_cuda.py)"
t0=$(date +%s)
timeout 60 $PY -m pytest tests/optim/test_adamw_cuda.py -v -p no:cacheprovider \
  --junitxml="$OUT/junit_optim_cuda.xml" > "$OUT/optim_cuda.log" 2>&1
optim_rc=$?
echo "optimizer CUDA tests rc=$optim_rc in $(( $(date +%s) - t0 ))s: $(tail -1 "$OUT/optim_cuda.log")" | tee -a "$OUT/summary.txt"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/optim_cuda.log" | grep "::" | sed 's/^tests.optim.test_adamw_cuda.py:://' \
  | head -40 | tee -a "$OUT/summary.txt"
step "attention: sm_90 resources of every kernel config, and both backwards"
t0=$(date +%s)
# every autotuning candidate of the three attention kernels (head dims 64/128/256, bf16 and fp32,
# three feature variants) compiled for sm_90: shared memory from the compile metadata, registers
# and spills from cuobjdump -res-usage; then fwd+bwd at L=512 (B=32 H=12 D=64, bf16/fp16, mask
# and dropout on/off), interleaved over SDPA, eager, the default backward (turbotune: atomic dQ)
# and the deterministic one (turbotune-det), with one fixed block config (no autotuning wait)
timeout 240 $PY tests/ops/attention_sm90.py --configs all --jobs 8 --out "$OUT/attention_sm90.jsonl" \
  2> "$OUT/attention_sm90.err" | tee -a "$OUT/summary.txt"
echo "attention_sm90 rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
(TURBOTUNE_AUTOTUNE=0 timeout 120 $PY benchmarks/bench_attention.py 512 > "$OUT/attention_bwd.md" 2>&1
 echo "rc=$?" >> "$OUT/attention_bwd.md")
cat "$OUT/attention_bwd.md" | tee -a "$OUT/summary.txt"
step "product GPU tests (finetune / bench timing on CUDA)"
timeout 120 $PY -m pytest tests/cli tests/bench -m gpu -q -p no:cacheprovider > "$OUT/tests_product.log" 2>&1
echo "product gpu tests rc=$?: $(tail -1 "$OUT/tests_product.log")" | tee -a "$OUT/summary.txt"

step "turbotune bench --quick"
t0=$(date +%s)
(cd "$OUT" && timeout 120 $PY -m turbotune bench --quick --no-progress --out "$OUT/bench") > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc in $(( $(date +%s) - t0 ))s (bench/bench.json, bench/bench.md)" | tee -a "$OUT/summary.txt"

# LayerNorm / bias+GELU / cross-entropy: fwd and fwd+bwd vs torch, then the LayerNorm
# backward launch-plan sweep (rows per tile x programs per SM) that picks its defaults (<= 150 s).
step "row ops: LayerNorm / bias+GELU / cross-entropy vs torch, LayerNorm backward plans"
t0=$(date +%s)
timeout 150 $PY -c "from turbotune.bench.suites.layer_norm import gpu_report; gpu_report()" > "$OUT/rowops.log" 2>&1
echo "row ops rc=$? in $(( $(date +%s) - t0 ))s (rowops.log)" | tee -a "$OUT/summary.txt"
tee -a "$OUT/summary.txt" < "$OUT/rowops.log"

step "CNN goals: fused BN+add+ReLU >= 2x torch; ResNet-18/50 bf16 train step >= 1.2x stock eager"
t0=$(date +%s)
timeout 150 $PY benchmarks/bench_cnn.py --goals --rounds 10 > "$OUT/cnn_goals.log" 2>&1
echo "cnn goals rc=$? in $(( $(date +%s) - t0 ))s (cnn_goals.log)" | tee -a "$OUT/summary.txt"
grep -E "^GOAL" "$OUT/cnn_goals.log" | tee -a "$OUT/summary.txt"

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
[ $test_rc -eq 0 ] && [ $optim_rc -eq 0 ] && [ $bench_rc -eq 0 ]
