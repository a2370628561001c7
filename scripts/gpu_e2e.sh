#!/usr/bin/env bash
# On the lent GPU: benchmarks/e2e.py (the 8-shot, 180k-token story end to end). Carry .whl and
# .whl_e2e (PyAV, for the H.264 videos; the GPU image lacks it): make both here with
# scripts/prepare_gpu_carry.sh. The working tree (34 MB with the shipped default model) and the
# carry must fit in 64 MiB together, and .whl_e2e is 35 MB: move assets/default_model out of the
# working tree here for the e2e calls (e2e.py does not use it; move it back after), then the tree,
# .whl and .whl_e2e fit one call (2026-11-29). The random Wan2.1-1.3B checkpoint is built in
# /root/e2e once per machine and reused by later calls while the machine stays warm (30 s idle), so
# the parts can be split over calls made back to back: --parts forward (about 4 min), --parts
# scaling (about 5) and --parts render (about 8 at the app's 12 steps). Every part runs capped at an
# H100's 79 GiB (e2e.py --memory-gib). The videos stay on the machine (noise compresses badly);
# their codec, frame counts and sizes are in the JSON. Brought back: the JSON, the log, the scaling
# plot and one story video.
# Usage: bash scripts/gpu_e2e.sh NAME [benchmarks/e2e.py args]   (NAME: the JSON's name under $OUT)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl_e2e/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
name=${1:-e2e}; shift || true
mkdir -p /root/e2e
python3 benchmarks/e2e.py --work /root/e2e --log-dir /root/e2e/out --json "$OUT/$name.json" "$@" 2>&1 \
  | grep -v "Warning\|warn(" | tail -n 60
cp /root/e2e/out/e2e_log.txt "$OUT/${name}_log.txt" 2>/dev/null
cp /root/e2e/out/e2e_scaling.png "$OUT/" 2>/dev/null
f=/root/e2e/out/moc_joint/story.mp4
[ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 15000000 ] && cp "$f" "$OUT/moc_joint_story.mp4"
ls -la "$OUT"
