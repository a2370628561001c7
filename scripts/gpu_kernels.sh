#!/usr/bin/env bash
# On the lent GPU, one call (about 8 minutes): the checks and timings issue 10 and 11 wait on.
# 1. gather against the float32 reference on the GPU, values and gradients, with step 1 (the forced
#    links) as the default, through cuDNN per forced group (forced="sdpa") and through the tile kernel;
# 2. benchmarks/attention.py at MoC-180k: gather with either step 1, step 1 alone both ways (with
#    the cuDNN path's output and log-sum-exp error against the tile kernel), dense cuDNN;
# 3. benchmarks/forward_gaps.py on the whole Wan2.1-1.3B-architecture forward at 180k: where the GPU
#    sits idle (the longest gaps with the host operations running in each, the synchronisation
#    sites, the allocator's device allocations and frees).
# Carry .whl (diffusers, for 3). Results under $OUT: attention_forced_180k.json, forward_gaps.json,
# kernels_log.txt. Usage: bash scripts/gpu_kernels.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$OUT/kernels_log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
if python3 -c "import pytest" 2>/dev/null; then
  timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/engine/moc/test_triton.py -k gather 2>&1 | tail -n 5 | tee -a "$log"
else
  echo "pytest is not installed here: the GPU gather tests did not run" | tee -a "$log"
fi
timeout 240 python3 benchmarks/attention.py --sizes 180k --inputs structured random --repeats 5 \
  --backends moc-gather moc-gather-sdpa-forced forced-triton forced-sdpa dense-cudnn \
  --json "$OUT/attention_forced_180k.json" 2>&1 | grep -v "Warning\|warn(" | tail -n 30 | tee -a "$log"
timeout 200 python3 benchmarks/forward_gaps.py --shots 8 --variants moc-gather,dense-cudnn \
  --json "$OUT/forward_gaps.json" 2>&1 | grep -v "Warning\|warn(" | tail -n 40 | tee -a "$log"
ls -la "$OUT"
