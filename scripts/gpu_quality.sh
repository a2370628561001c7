#!/usr/bin/env bash
# On the lent GPU (after gpu_train.sh installed the wheels): the quality benchmark in SHARDS parallel
# processes (the model is small and launch-bound, so processes share the GPU well), each starting no
# story after LIMIT seconds; the shards merged into $OUT/quality.json and $OUT/quality.txt.
# MODEL: a model folder; "trained": wait up to WAIT seconds for the training's export
# (/root/run/model, else model_latest); "recipe": the default's architecture with random weights
# (timing and a GPU check of the benchmark before a trained model exists).
# Each shard rewrites its JSON after every story and gets nproc / SHARDS CPU threads (16 threads
# each in 12 processes starved run 2's call: no shard finished a story). DEADLINE (seconds, env)
# stops the shards that are still running then; their finished stories are merged all the same.
# Two benchmarks side by side (one per GPU of a two-GPU machine) each take their own RUN (the
# training's folder for "trained", default /root/run), NAME (the outputs' name, default quality)
# and CUDA_VISIBLE_DEVICES; THREADS overrides the CPU threads a shard gets.
# Usage: [DEADLINE=S RUN=DIR NAME=N THREADS=T] bash scripts/gpu_quality.sh MODEL WAIT LIMIT SHARDS [quality.py args]
set -u
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 STORYBOARD_MINILM=$PWD/.carry/minilm
model=$1 wait=$2 limit=$3 shards=$4; shift 4
run=${RUN:-/root/run} name=${NAME:-quality}
if [ "$model" = trained ]; then
  end=$(( $(date +%s) + wait ))
  while [ ! -f "$run/model/storyboard.json" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
  model=$run/model; [ -f "$model/storyboard.json" ] || model=$run/model_latest
elif [ "$model" = recipe ]; then
  python3 -c "from engine.default_model import write_recipe_model as w; w('/tmp/recipe')" || exit 1
  model=/tmp/recipe
fi
echo "quality of $model: $shards shards, $limit s"
q=/tmp/$name; rm -rf $q; mkdir -p $q
threads=${THREADS:-$(( $(nproc) / shards ))}; [ "$threads" -ge 1 ] || threads=1
pids=()
for i in $(seq 0 $((shards - 1))); do
  OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads python3 benchmarks/quality.py --model "$model" --device cuda \
    --shard "$i/$shards" --time-limit "$limit" --json "$q/part$i.json" "$@" > "$q/log$i.txt" 2>&1 &
  pids+=($!)
done
killer=
if [ "${DEADLINE:-0}" -gt 0 ]; then (sleep "$DEADLINE"; kill "${pids[@]}" 2>/dev/null) > /dev/null 2>&1 & killer=$!; fi
wait "${pids[@]}"
[ -z "$killer" ] || { pkill -P "$killer" 2>/dev/null; kill "$killer" 2>/dev/null; }
tail -qn 2 $q/log*.txt | grep -v "^wrote" | cut -c1-300
parts=$(ls $q/part*.json 2>/dev/null)
[ -n "$parts" ] || { echo "no shard finished a story"; exit 1; }
python3 benchmarks/quality.py --merge $parts --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
cat "$OUT/$name.txt"
