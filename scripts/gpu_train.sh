#!/usr/bin/env bash
# On the lent GPU (device tool): install the carried wheels, smoke-test the trainer on the GPU
# (Triton backend), then start the real training detached (setsid) and show its first lines.
# Carry: .whl (diffusers, importlib_metadata) and .carry/minilm (MiniLM weights in fp16); make
# both here with scripts/prepare_gpu_carry.sh.
# RUN (env, default /root/run) is the run's folder; two runs side by side on a two-GPU machine take
# their own RUN and CUDA_VISIBLE_DEVICES.
# Usage: [RUN=DIR] bash scripts/gpu_train.sh MINUTES [extra train_default.py args]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
minutes=${1:-20}; shift || true
if [ "${SMOKE:-1}" = 1 ]; then
  python3 scripts/train_default.py --work /tmp/smoke --tiny --codec-steps 5 --max-steps 4 --text-encoder .carry/minilm 2>&1 | tail -4 || exit 1
fi
run=${RUN:-/root/run}
mkdir -p "$run"
setsid nohup python3 scripts/train_default.py --work "$run" --minutes "$minutes" --text-encoder .carry/minilm \
  --export "$run/model" "$@" > "$run/log.txt" 2>&1 < /dev/null &
sleep ${WAIT:-100}
tail -n 25 "$run/log.txt"
