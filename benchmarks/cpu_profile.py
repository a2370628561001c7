"""Where the default story's CPU render time goes: imports, loading, sampling and decoding.

    python benchmarks/cpu_profile.py [--story examples/default_story.json] [--json PATH]

One process, as `launch.py --story` runs: the imports (torch, diffusers, the engine) and the model
load are timed in order, then one render with a fresh shot cache under torch.profiler. The engine's
profiler ranges split the render: `storyboard.attention` (every self-attention call, MoC routing
included), `moc.routing` (the routing alone), `storyboard.decode` (latents -> frames); the rest is
the transformer's other layers, the sampler and the files. The profiler's bookkeeping makes the
render a few percent slower than in `benchmarks/cpu_render.py`, which owns the 60 s budget; this
one explains it. Prints a table and writes JSON (default benchmarks/results/cpu_profile.json).
Trends, not targets: the tests run it on a tiny model and never assert times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def profile_render(story_path: Path, model: Path | None, device: str = "cpu") -> dict:
    """Phase times (seconds) of one fresh-cache render of `story_path`, and the render's split."""
    phases = {}
    t = time.perf_counter()
    import torch
    phases["import torch"] = time.perf_counter() - t
    t = time.perf_counter()
    from diffusers import AutoencoderKL, WanTransformer3DModel  # noqa: F401  (what model loading imports)
    phases["import diffusers"] = time.perf_counter() - t
    t = time.perf_counter()
    from engine.engine import DECODE_RANGE, StoryEngine
    from engine.moc.attention import ATTENTION_RANGE, ROUTING_RANGE
    from engine.story import Story
    phases["import engine"] = time.perf_counter() - t
    story = Story.load(story_path)
    work = Path(tempfile.mkdtemp(prefix="cpu-profile-"))
    try:
        t = time.perf_counter()
        engine = StoryEngine.load(model, device=device, cache_dir=work / "cache")
        phases["load model and text encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.render(story, out_dir=work / "out")
        render = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ranges = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in (ATTENTION_RANGE, ROUTING_RANGE, DECODE_RANGE)}
    attention, routing, decode = (ranges.get(k, 0.0) for k in (ATTENTION_RANGE, ROUTING_RANGE, DECODE_RANGE))
    calls = {e.key: e.count for e in prof.key_averages() if e.key == ATTENTION_RANGE}
    split = {"self-attention, routing excluded": attention - routing, "MoC routing": routing, "decoding": decode,
             "transformer's other layers, sampler, files": render - attention - decode}
    return {"phases_s": {k: round(v, 3) for k, v in phases.items()}, "render_s": round(render, 3),
            "render_split_s": {k: round(v, 3) for k, v in split.items()},
            "attention_calls": calls.get(ATTENTION_RANGE, 0),
            "story": {"path": str(story_path), "shots": len(story.shots), "frames": [s.frames for s in story.shots],
                      "steps": story.settings.steps, "guidance": story.settings.guidance, "mode": story.settings.mode},
            "model": engine.model_name, "torch_threads": torch.get_num_threads(), "device": device}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--story", type=Path, default=ROOT / "examples" / "default_story.json")
    p.add_argument("--model", type=Path, help="model folder (default: the shipped default model)")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_profile.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = profile_render(args.story, args.model)
    result.update(benchmark="cpu_profile", date=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  machine={"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "load_1min_at_end": round(os.getloadavg()[0], 2)})
    total = sum(result["phases_s"].values()) + result["render_s"]
    print(f"{result['story']['path']}: {result['story']['shots']} shots, {result['story']['steps']} steps, "
          f"{result['model']}, {result['torch_threads']} torch threads")
    print(f"{'part':<46}{'seconds':>9}{'share':>8}")
    for name, s in list(result["phases_s"].items()) + [("render", result["render_s"])]:
        print(f"{name:<46}{s:9.2f}{s / total:8.1%}")
    for name, s in result["render_split_s"].items():
        print(f"  {name:<44}{s:9.2f}{s / result['render_s']:8.1%} of the render")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
