"""CPU budget: the default 4-shot example story renders on this 2-core CPU in <= 60 s end to end.

Each repeat runs the headless CLI in a fresh process, as a user would:
    python launch.py --story examples/default_story.json --out TMP/out --cache-dir TMP/cache --device cpu
so interpreter start, imports and model loading are counted, and the shot cache is new (no shot
is served from it). Wall time runs from process start to exit. The split comes from the
summary.json the CLI writes (engine/engine.py `_summary`): `render` is the engine's render call
(sampling, decoding, MP4s, routing report), `shots` its per-shot seconds (a joint run's sampling
time shared out by frames, plus decoding), `startup` the rest of the wall time (Python, imports,
model and text-encoder loading, exit). Each run also records the child's CPU seconds and the
1-minute load average at its start: other work on the machine shows as a load above the CPU
count (the JSON's `busy`), and the times are then upper bounds.

Run:  python benchmarks/cpu_render.py [--repeats 3] [--story PATH] [--model PATH | --recipe] [--json PATH]
--recipe times the trained default's architecture with random weights (engine/default_model.py
`write_recipe_model`): the CPU budget of a model before it is trained.
Prints a table and writes JSON (default benchmarks/results/cpu_render.json). Pass means the
median wall time is within the target; the test suite never asserts on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.story import Story  # noqa: E402  (standard library only: the timed work stays in the children)

DEFAULT_STORY = ROOT / "examples" / "default_story.json"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "cpu_render.json"
TARGET_S = 60.0  # the product's CPU budget for the default story, end to end


def render_once(story: Path, model: Path | None, timeout: float) -> dict:
    """One fresh `launch.py --story` process with a fresh shot cache: wall time and the CLI's split."""
    with tempfile.TemporaryDirectory(prefix="cpu-render-") as tmp:
        out, cache = Path(tmp) / "out", Path(tmp) / "cache"
        command = [sys.executable, "launch.py", "--story", str(story), "--out", str(out),
                   "--cache-dir", str(cache), "--device", "cpu"] + (["--model", str(model)] if model else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        load = os.getloadavg()[0]
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"launch.py exited with {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        summary = json.loads((out / "summary.json").read_text())
    statuses = [s["status"] for s in summary["shots"]]
    if any(s != "generated" for s in statuses):
        raise SystemExit(f"a fresh cache served shots ({statuses}): the measurement would not be end to end")
    shots = [float(s["seconds"]) for s in summary["shots"]]
    render = float(summary["seconds"])
    return {"wall_s": round(wall, 3), "startup_s": round(wall - render, 3), "render_s": render, "shots_s": shots,
            "sampling_and_decoding_s": round(sum(shots), 3), "videos_and_report_s": round(render - sum(shots), 3),
            "cpu_s": round(cpu, 3), "load_1min_at_start": round(load, 2), "statuses": statuses,
            "model": summary["model"], "trained": summary["trained"], "model_identity": summary["model_identity"],
            "device": summary["device"],
            "cli_output": proc.stdout.strip().splitlines()}


def machine() -> dict:
    import torch  # the children start the same interpreter with the same environment

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": affinity,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--story", type=Path, default=DEFAULT_STORY, help="story JSON (default: the 4-shot default)")
    parser.add_argument("--model", type=Path, help="model folder (default: the shipped default model)")
    parser.add_argument("--recipe", action="store_true",
                        help="time the trained default's architecture with random weights (no --model)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes to time")
    parser.add_argument("--target", type=float, default=TARGET_S, help="budget in seconds for the median")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one run is killed")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the result here")
    args = parser.parse_args(argv)
    if args.recipe:
        if args.model is not None:
            parser.error("--recipe builds its own model folder: drop --model")
        from engine.default_model import write_recipe_model
        args.model = write_recipe_model(Path(tempfile.mkdtemp(prefix="recipe-model-")) / "recipe")
    story_path = args.story.resolve()
    story = Story.load(story_path)
    settings = story.settings
    host = machine()
    print(f"{story_path.name}: {len(story.shots)} shots x {[s.frames for s in story.shots]} latent frames, "
          f"{settings.steps} steps, guidance {settings.guidance}, {settings.mode}, {settings.height}x{settings.width}")
    print(f"CPU: {host['cpu']}, {host['usable_cpus']} of {host['cpu_count']} CPUs usable, "
          f"torch {host['torch_threads']} threads")

    runs = []
    print(f"{'run':>4} {'wall s':>8} {'startup s':>10} {'render s':>9} {'videos s':>9} {'cpu s':>8} {'load':>5}"
          f"  per-shot s")
    for i in range(args.repeats):
        run = render_once(story_path, args.model, args.timeout)
        runs.append(run)
        print(f"{i + 1:>4} {run['wall_s']:>8.2f} {run['startup_s']:>10.2f} {run['render_s']:>9.2f} "
              f"{run['videos_and_report_s']:>9.2f} {run['cpu_s']:>8.1f} {run['load_1min_at_start']:>5.1f}  "
              f"{' '.join(f'{s:.2f}' for s in run['shots_s'])}", flush=True)

    walls = [r["wall_s"] for r in runs]
    median = statistics.median(walls)
    passed = median <= args.target
    print(f"wall time: median {median:.2f} s, min {min(walls):.2f} s, max {max(walls):.2f} s; "
          f"target {args.target:.0f} s: {'PASS' if passed else 'FAIL'}")
    busy = max(r["load_1min_at_start"] for r in runs) > host["usable_cpus"]  # more than our own runs' load
    if busy:
        print(f"warning: the machine was busy (1-minute load up to {max(r['load_1min_at_start'] for r in runs):.1f} "
              f"on {host['usable_cpus']} CPUs): these times are upper bounds")
    print(f"model: {runs[0]['model']}{'' if runs[0]['trained'] else ' [untrained]'}; torch threads "
          f"{host['torch_threads']}, CPUs {host['usable_cpus']}")

    result = {
        "benchmark": "cpu_render", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "criterion": "median wall time of a fresh `launch.py --story` process with a fresh cache <= target_s",
        "target_s": args.target, "passed": passed, "busy": busy,
        "wall_s": {"median": round(median, 3), "min": min(walls), "max": max(walls)},
        "story": {"path": os.path.relpath(story_path, ROOT), "shots": len(story.shots),
                  "frames": [s.frames for s in story.shots],
                  **{k: getattr(settings, k) for k in ("steps", "guidance", "mode", "height", "width")}},
        "model": {"name": runs[0]["model"], "trained": runs[0]["trained"], "identity": runs[0]["model_identity"]},
        "machine": host,
        "runs": [{k: v for k, v in r.items() if k not in ("model", "trained", "model_identity")} for r in runs],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
