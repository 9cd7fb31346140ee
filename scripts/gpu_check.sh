#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (CUDA toolkit, torch with CUDA and
# Triton already installed, no network needed):
#
#   scripts/gpu_check.sh OUT_DIR
#
# Steps, most important first; each has its own cap and all share one deadline
# (GPU_CHECK_BUDGET seconds, default 480: the device budget of a session is 15 minutes,
# machine start included), so a slow step shortens or skips the later ones, never the summary:
#  1. build the extension with the CUDA kernels for the local GPU only (e.g. sm_90) and
#     install it into the current Python (no dependencies fetched)        cap 150 s
#  2. `turbotune info`
#  3. the GPU test subset: ops, optim (incl. tests/optim/test_adamw_cuda.py: CUDA AdamW vs
#     the CPU kernel and torch, shared stochastic-rounding bits, master copy moved with the
#     model, GradScaler, found_inf, amsgrad NaN, zero-element params, fused clipping),
#     models, backend, and the `gpu`-marked CLI / bench tests: Triton kernels compiled for
#     real, the CUDA C++ kernels run, torch.compile sees the ops               cap 200 s
#  4. `turbotune bench --quick` (JSON + Markdown + PNG under OUT_DIR/bench)   cap 120 s
#  5. CNN goals (benchmarks/bench_cnn.py --goals: fused BN+act(+add) vs torch, ResNet
#     bf16 train step vs stock eager, paired rounds)                          cap 90 s
#  6. row ops (LayerNorm / bias+GELU / cross-entropy) vs torch and the LayerNorm
#     backward launch-plan sweep                                              cap 90 s
#  7. attention fwd+bwd at L=512 (SDPA, eager, turbotune, deterministic)      cap 60 s
#  8. attention sm_90 resources of every kernel config (registers, spills)   what is left
#  9. a short table of the bench ratios (always).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET TURBOTUNE_BACKEND

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)" | tee -a "$OUT/summary.txt"; }
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-480} ))
# cap SECONDS: the timeout of a step, the smaller of its cap and the time left (at least 1: `timeout 0` would mean no limit)
cap() { local left=$(( DEADLINE - $(date +%s) - 15 )); [ $left -lt $1 ] && echo $(( left > 1 ? left : 1 )) || echo $1; }
skipped() { echo "skipped: out of time (GPU_CHECK_BUDGET)" | tee -a "$OUT/summary.txt"; }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
ARCH=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')") || { echo "no CUDA device visible to torch"; exit 1; }
echo "compute capability sm_$ARCH" | tee -a "$OUT/summary.txt"

step "build (TURBOTUNE_CUDA=ON, sm_$ARCH)"
t0=$(date +%s)
TURBOTUNE_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real" \
  timeout $(cap 150) $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - t0 ))s (log: build.log)" | tee -a "$OUT/summary.txt"
[ $build_rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

step "turbotune info"
(cd "$OUT" && $PY -m turbotune info) > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

step "tests on the GPU"
t0=$(date +%s)
timeout $(cap 170) $PY -m pytest tests/ops tests/optim tests/models tests/test_backend.py -q -p no:cacheprovider \
  --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
echo "tests rc=$test_rc in $(( $(date +%s) - t0 ))s: $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 | tee -a "$OUT/summary.txt"
grep -E "test_adamw_cuda.py::" "$OUT/tests.log" | head -20 | tee -a "$OUT/summary.txt"
t=$(cap 30)
if [ "$t" -gt 5 ]; then
  timeout $t $PY -m pytest tests/cli tests/bench -m gpu -q -p no:cacheprovider > "$OUT/tests_product.log" 2>&1
  echo "product gpu tests rc=$?: $(tail -1 "$OUT/tests_product.log")" | tee -a "$OUT/summary.txt"
fi

step "turbotune bench --quick"
t0=$(date +%s)
(cd "$OUT" && timeout $(cap 120) $PY -m turbotune bench --quick --no-progress --out "$OUT/bench") > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc in $(( $(date +%s) - t0 ))s (bench/bench.json, bench/bench.md)" | tee -a "$OUT/summary.txt"

step "CNN goals: fused BN+add+ReLU >= 2x torch; ResNet-18/50 bf16 train step >= 1.2x stock eager"
t0=$(date +%s)
timeout $(cap 90) $PY benchmarks/bench_cnn.py --goals --rounds 6 > "$OUT/cnn_goals.log" 2>&1
echo "cnn goals rc=$? in $(( $(date +%s) - t0 ))s (cnn_goals.log)" | tee -a "$OUT/summary.txt"
grep -E "^GOAL" "$OUT/cnn_goals.log" | tee -a "$OUT/summary.txt"

# LayerNorm / bias+GELU / cross-entropy: fwd and fwd+bwd vs torch, then the LayerNorm
# backward launch-plan sweep (rows per tile x programs per SM) that picks its defaults .
step "row ops: LayerNorm / bias+GELU / cross-entropy vs torch, LayerNorm backward plans"
t0=$(date +%s)
timeout $(cap 90) $PY -c "from turbotune.bench.suites.layer_norm import gpu_report; gpu_report()" > "$OUT/rowops.log" 2>&1
echo "row ops rc=$? in $(( $(date +%s) - t0 ))s (rowops.log)" | tee -a "$OUT/summary.txt"
tee -a "$OUT/summary.txt" < "$OUT/rowops.log"

step "attention fwd+bwd at L=512: SDPA, eager, turbotune (atomic dQ), turbotune-det (fixed block config)"
t=$(cap 60)
if [ "$t" -gt 10 ]; then
  (TURBOTUNE_AUTOTUNE=0 timeout $t $PY benchmarks/bench_attention.py 512 > "$OUT/attention_bwd.md" 2>&1
   echo "rc=$?" >> "$OUT/attention_bwd.md")
  tee -a "$OUT/summary.txt" < "$OUT/attention_bwd.md"
else skipped; fi

step "attention: sm_90 resources of every kernel config (shared memory, registers, spills)"
t=$(cap 240)
if [ "$t" -gt 20 ]; then
  timeout $t $PY tests/ops/attention_sm90.py --configs all --jobs 8 --out "$OUT/attention_sm90.jsonl" \
    2> "$OUT/attention_sm90.err" | tee -a "$OUT/summary.txt"
  echo "attention_sm90 rc=${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
else skipped; fi

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
