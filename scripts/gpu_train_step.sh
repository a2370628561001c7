#!/usr/bin/env bash
# On the lent GPU, one call (about 4 minutes): what the trainer's step costs now, before run 11.
# benchmarks/train_step.py with --compile (the blocks compiled, StoryTransformer.compile_blocks,
# against eager; the compile time of the first steps) and --profile (host synchronisations per
# step by Python line, launches, device busy time against wall time), MoC on 64-row tiles as the
# trainer runs it, and on backend "gather" (--gather: its forced links and their backward on
# cuDNN since 2026-12-07, which may now win at the training stories' 6k keys; train_default.py
# --moc-backend gather trains with it). Carry .whl (diffusers). Results under $OUT: train_step.json, train_step_log.txt.
# Usage: bash scripts/gpu_train_step.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log="$OUT/train_step_log.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
timeout 420 python3 benchmarks/train_step.py --repeats 4 --tiles 64 --gather --compile --profile \
  --json "$OUT/train_step.json" 2>&1 | grep -v "Warning\|warn(" | tail -n 60 | tee -a "$log"
ls -la "$OUT"
