#!/usr/bin/env bash
# One device call: the GPU tests and/or the attention benchmark; logs and JSON under $OUT.
#   bash benchmarks/gpu_run.sh [full|quick|probe|bench]
# full:  GPU tests (MoC) + the whole benchmark table -> $OUT/attention_h100.json (~10 min: split it
#        into `quick` and `bench` calls when a call is capped at 10 minutes)
# quick: GPU tests of the Triton kernels + per-kernel breakdown at 16k/180k + Triton vs cuDNN
# probe: quick without the tests;  bench: the whole table without the tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moc_gpu_out}
mkdir -p "$OUT"
MODE=${1:-full}
export PYTHONUNBUFFERED=1 TRITON_PRINT_AUTOTUNING=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$MODE" = "quick" ] || [ "$MODE" = "full" ]; then
  TESTS="tests/engine/moc/test_triton.py tests/engine/moc/test_attention.py tests/engine/moc/test_routing.py"
  [ "$MODE" = "quick" ] && TESTS="tests/engine/moc/test_triton.py"
  timeout 420 python3 -m pytest -q -p no:cacheprovider --durations=5 $TESTS > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$OUT/tests.log" | tail -15
fi
if [ "$MODE" = "quick" ] || [ "$MODE" = "probe" ]; then
  for size in 16k 180k; do
    python3 benchmarks/attention_breakdown.py --size $size 2>&1 | grep -v "^Autotuning\|^Triton autotuning\|^with key\|^finished\|^best config" | tee -a "$OUT/breakdown.log"
  done
  python3 benchmarks/attention.py --sizes 16k 180k --inputs structured --backends moc-triton dense-cudnn \
    --repeats 6 --json "$OUT/attention_quick.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^Autotuning\|^with key\|^finished"
else
  python3 benchmarks/attention.py --repeats 6 --json "$OUT/attention_h100.json" 2>&1 | tee "$OUT/bench.log" | grep -v "^Autotuning\|^with key\|^finished"
fi
