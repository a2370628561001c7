#!/usr/bin/env bash
# On the lent GPU, one call (about 9 minutes on an H200): the checks and timings issue 10 waits on.
# 1. the MoC kernel tests on the GPU (tests/engine/moc/test_triton.py, test_host_reads.py,
#    test_gather_pairs.py, test_forced.py: every kernel, cuDNN's backward from merged statistics,
#    the CUDA-graph replay and auto's choice against the float32 reference, values and gradients;
#    every test runs, no -x, so one failure does not hide the rest; TESTS (env) is the -k filter,
#    by default the gather, CUDA-graph and forced-link tests, to leave the call time to benchmark);
# 2. benchmarks/attention.py, structured and random inputs: at 180k the tile kernels, gather (step
#    1 and its backward on the tile kernel, and on cuDNN), gather's forward merged in place (no
#    per-pair buffers, a group of heads at a time: triton_gather.GATHER_MERGES), gather's buffered
#    forward in query pieces of 64 MiB (moc-gather-pieces), auto and dense cuDNN; at 16k and 64k
#    gather, gather replayed from one CUDA graph (MoC without its launch and host work), auto and
#    dense cuDNN; each row split by kernel (--kernels).
# The whole Wan forward at 180k is separate (about 4 minutes):
#    python3 benchmarks/forward_gaps.py --shots 8 --variants moc-auto,dense-cudnn,no-self-attention [--compile]
# Carry .whl (diffusers: forward_gaps only). Results under $OUT: attention_180k.json,
# attention_small.json, kernels_log.txt.
# BACKENDS_180K and BACKENDS_SMALL (env) replace the two runs' backend lists; AUTO_GRAPHS=1 lets
# moc-auto replay a CUDA graph at 16k (engine.moc.attention.AUTO_GRAPHS, off by default).
# Usage: bash scripts/gpu_kernels.sh
set -uo pipefail
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$OUT/kernels_log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
if python3 -c "import pytest" 2>/dev/null; then
  timeout 170 python3 -m pytest -q -p no:cacheprovider tests/engine/moc/test_triton.py tests/engine/moc/test_host_reads.py \
    tests/engine/moc/test_gather_pairs.py tests/engine/moc/test_forced.py -k "${TESTS:-gather or graph or forced}" \
    2>&1 | tail -n 12 | tee -a "$log"
else
  echo "pytest is not installed here: the GPU kernel tests did not run" | tee -a "$log"
fi
# 180k first (the targets), then 16k and 64k with the CUDA-graph row; each run writes its
# JSON after every size and input kind, so a call cut short keeps what finished
timeout $((430 - SECONDS)) python3 benchmarks/attention.py --sizes 180k --inputs structured random --repeats 5 \
  --backends ${BACKENDS_180K:-moc-triton moc-gather moc-gather-sdpa-forced moc-gather-in-place moc-gather-pieces moc-auto dense-cudnn} --kernels \
  --json "$OUT/attention_180k.json" 2>&1 | grep -v "Warning\|warn(" | tail -n 40 | cut -c1-700 | tee -a "$log"
timeout $((585 - SECONDS)) python3 benchmarks/attention.py --sizes 16k 64k --inputs structured random --repeats 5 ${AUTO_GRAPHS:+--auto-graphs} \
  --backends ${BACKENDS_SMALL:-moc-gather-sdpa-forced moc-gather-in-place moc-gather-pieces moc-gather-graph moc-auto dense-cudnn} --kernels \
  --json "$OUT/attention_small.json" 2>&1 | grep -v "Warning\|warn(" | tail -n 40 | cut -c1-500 | tee -a "$log"
ls -la "$OUT"
