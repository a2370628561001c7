#!/usr/bin/env bash
# On the lent GPU: keep the call (and so the machine) alive while detached trainings run, printing
# their progress; when every run's exported model exists, or its training has stopped (done, or
# halted by --codec-gate, or crashed), pack what there is (model, logs, samples, the codec's check)
# into $OUT in pieces under 16 MB, one archive per run: NAME.tgz.aa, ... for the run folder NAME.
# When SECONDS run out first, pack the latest checkpoint's fp16 export (model_latest, written at
# every checkpoint) instead, so a call cut short still brings back a model to warm-start from
# (train_default.py --init-from). Set SECONDS well inside the device time left: a call stopped by
# the budget returns nothing.
# RUNS (env, default /root/run): the run folders, space-separated (gpu_train.sh's RUN). PACK_MODEL=0
# leaves the models out: a large reply takes long enough to arrive that the idle machine goes back.
# Usage: [RUNS="DIR ..."] bash scripts/gpu_poll.sh SECONDS
set -u
runs=${RUNS:-/root/run}
end=$(( $(date +%s) + ${1:-560} ))
running() {  # is any run neither exported nor stopped?
  for run in $runs; do
    [ -f "$run/model/storyboard.json" ] && continue
    pgrep -f "scripts/train_default.py --work $run --minutes" >/dev/null && return 0
  done
  return 1
}
while [ "$(date +%s)" -lt "$end" ] && running; do sleep 20; done
for run in $runs; do
  echo "== $run"
  grep -v "Loading weights" "$run/log.txt" | tail -n 8
  model=model
  [ -f "$run/model/storyboard.json" ] || model=model_latest
  [ "${PACK_MODEL:-1}" = 1 ] || model=none  # PACK_MODEL=0: logs and samples only (a small reply)
  name=$(basename "$run")
  (cd "$run" && tar czf "/tmp/$name.tgz" $( [ -f "$model/storyboard.json" ] && echo "$model" ) samples \
    codec_reconstructions.png train_log.jsonl codec_log.jsonl codec/codec.json log.txt config.json 2>/dev/null)
  split -b 15M "/tmp/$name.tgz" "$OUT/$name.tgz."
done
ls -la "$OUT"
