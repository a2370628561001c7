#!/usr/bin/env bash
# On the lent GPU, one call (about 7 minutes): the checks and timings issues 10 and 11 wait on.
# 1. the gather backend, its merge kernel and auto's choice against the float32 reference on the
#    GPU, values and gradients, step 1 (the forced links) both ways (every test runs: no -x, so one
#    failure does not hide the rest);
# 2. benchmarks/attention.py at MoC-180k: auto, the tile kernels and gather with either step 1 in
#    one run (auto renders with gather since the merge kernel; the run checks that against the tile
#    kernels on the same inputs), dense cuDNN, each row split by kernel (--kernels) and set against
#    the ideal (density x cuDNN);
# 3. benchmarks/forward_gaps.py on the whole Wan2.1-1.3B-architecture forward at 180k, eager and
#    with the blocks compiled, with the forward without self-attention, so that wall - that is what
#    self-attention costs in the model.
# Carry .whl (diffusers, for 3). Results under $OUT: attention_180k.json, forward_gaps.json,
# forward_gaps_compiled.json, kernels_log.txt. Usage: bash scripts/gpu_kernels.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$OUT/kernels_log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
if python3 -c "import pytest" 2>/dev/null; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/moc/test_triton.py tests/engine/moc/test_host_reads.py \
    -k "gather or merge or auto or reads or regeneration" 2>&1 | tail -n 12 | tee -a "$log"
else
  echo "pytest is not installed here: the GPU gather tests did not run" | tee -a "$log"
fi
timeout 240 python3 benchmarks/attention.py --sizes 180k --inputs structured random --repeats 5 \
  --backends moc-triton moc-auto moc-gather moc-gather-sdpa-forced dense-cudnn --kernels \
  --json "$OUT/attention_180k.json" 2>&1 | grep -v "Warning\|warn(" | tail -n 30 | tee -a "$log"
timeout 200 python3 benchmarks/forward_gaps.py --shots 8 --variants moc-gather,dense-cudnn,no-self-attention \
  --json "$OUT/forward_gaps.json" 2>&1 | grep -v "Warning\|warn(" | tail -n 40 | tee -a "$log"
# 4. the same with the blocks compiled (norms, modulation, feed-forward fused; attention eager), in
#    what is left of the call's 10 minutes
timeout $((570 - SECONDS)) python3 benchmarks/forward_gaps.py --shots 8 --compile \
  --variants moc-gather,dense-cudnn,no-self-attention --json "$OUT/forward_gaps_compiled.json" 2>&1 \
  | grep -v "Warning\|warn(" | grep -v "^    gap" | tail -n 12 | tee -a "$log"
ls -la "$OUT"
