#!/usr/bin/env bash
# On the lent GPU: keep the call (and so the machine) alive while a detached training runs,
# printing its progress; when the exported model exists, or the training has stopped (done, or
# halted by --codec-gate, or crashed), pack what there is (model, logs, samples, the codec's check)
# into $OUT in pieces under 16 MB. When SECONDS run out first, pack the latest checkpoint's fp16
# export (model_latest, written at every checkpoint) instead, so a call cut short still brings
# back a model to warm-start from (train_default.py --init-from). Set SECONDS well inside the
# device time left: a call stopped by the budget returns nothing. Usage: bash scripts/gpu_poll.sh SECONDS
set -u
end=$(( $(date +%s) + ${1:-560} ))
while [ "$(date +%s)" -lt "$end" ]; do
  [ -f /root/run/model/storyboard.json ] && break
  pgrep -f "scripts/train_default.py --work /root/run" >/dev/null || break  # nothing more will come
  sleep 20
done
grep -v "Loading weights" /root/run/log.txt | tail -n 8
model=model
[ -f /root/run/model/storyboard.json ] || model=model_latest
cd /root/run || exit 0
tar czf /tmp/run.tgz $( [ -f "$model/storyboard.json" ] && echo "$model" ) samples codec_reconstructions.png \
  train_log.jsonl codec_log.jsonl codec/codec.json log.txt config.json 2>/dev/null
split -b 15M /tmp/run.tgz "$OUT/run.tgz." && ls -la "$OUT"
