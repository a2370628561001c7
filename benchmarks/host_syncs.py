"""Where the GPU path waits for the GPU: every host synchronisation of a render and of one MoC call.

A host synchronisation (a read of a GPU value, a copy between host and GPU memory that is not
asynchronous, an explicit synchronize) stops the host from queueing work ahead of the GPU: the
GPU then idles while Python builds the next launches. At 22k query tokens a layer's kernels take
tens of milliseconds, so one synchronisation per layer costs a visible share of a regeneration.
This benchmark lists them by where they happen, with `torch.cuda.set_sync_debug_mode("warn")`:

  attend   `engine.moc.attend` (routing + the backend `auto` picks) on MoC-180k's layout at 16k
           tokens (benchmarks/attention.py's 16k, structured inputs), after warm-up calls (Triton compiled, the layout's tables memoised);
  render   the engine regenerating one shot of a small story with the others as cached context,
           both sides (the app's default), after a first render: context passes, sampling steps,
           the routing report, decoding.

Each row: the site (the innermost frames in this project's code, forward_gaps.sync_sites, which
counts one transformer forward the same way), how many times it synchronised. The JSON has the rows and the totals per MoC call / per forward.

    python benchmarks/host_syncs.py --json benchmarks/results/host_syncs_h100.json   (GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# sync_sites: the synchronising call sites inside a block, by torch's sync debug mode
from benchmarks.forward_gaps import sync_sites


def table(title: str, sites: Counter, per: int, unit: str) -> list[dict]:
    total = sum(sites.values())
    print(f"\n{title}: {total} synchronisations, {total / max(per, 1):.2f} per {unit}")
    rows = []
    for site, n in sites.most_common():
        print(f"  {n:6d}  {site}")
        rows.append({"site": site, "count": n})
    return rows


def audit_attend(device, tokens: int = 16_320, calls: int = 3) -> dict:
    from benchmarks.workload import moc_layout, structured_qkv
    from engine.moc import MoCConfig, attend
    layout = moc_layout(frame_tokens=tokens // 120)  # MoC-180k's 8 x 15 frames, fewer tokens a frame
    config = MoCConfig(top_k=5)
    q, k, v = structured_qkv(layout, 12, 128, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):  # compile, autotune, memoise
            attend(q, k, v, layout, config)
        torch.cuda.synchronize(device)
        with sync_sites() as sites:
            for _ in range(calls):
                _, sel = attend(q, k, v, layout, config)
        torch.cuda.synchronize(device)
    backend = sel.info.get("backend") if sel is not None else "dense-auto"
    rows = table(f"attend at {layout.num_tokens} tokens ({backend})", sites, calls, "call")
    return {"tokens": layout.num_tokens, "backend": backend, "calls": calls, "rows": rows,
            "per_call": round(sum(sites.values()) / calls, 3)}


def audit_render(device, work: Path, layers: int, steps: int) -> dict:
    from benchmarks.e2e import build_checkpoint, make_story
    from engine.engine import StoryEngine
    size = {"shots": 4, "frames": 3, "height": 480, "width": 800, "layers": layers}
    folder = work / "wan"
    if not (folder / "model_index.json").exists():
        build_checkpoint(folder, False, layers, device)
    engine = StoryEngine.load(folder, device=str(device), cache_dir=work / "cache")
    story = make_story(size, steps, "joint", True)
    t0 = time.perf_counter()
    engine.render(story, out_dir=work / "first")
    first = time.perf_counter() - t0
    story.shots[1].seed = 4_242  # a new take of shot 2: the others are cached context, both sides
    forwards = []

    def on_event(event):
        from engine.events import Progress
        if isinstance(event, Progress) and (event.context is not None or event.step >= 1):
            forwards.append(event)
    t0 = time.perf_counter()
    with sync_sites() as sites:
        result = engine.render(story, out_dir=work / "again", regenerate=1, on_event=on_event)
    torch.cuda.synchronize(device)
    again = time.perf_counter() - t0
    n = len(forwards)
    rows = table(f"regenerate shot 2 of 4, both sides ({n} forwards: context passes and steps)", sites, n,
                 "forward")
    return {"story": size, "steps": steps, "first_render_s": round(first, 2), "regenerate_s": round(again, 2),
            "both_sides": result.summary.get("both_sides"), "forwards": n, "rows": rows,
            "per_forward": round(sum(sites.values()) / max(n, 1), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="attend,render")
    p.add_argument("--layers", type=int, default=2, help="transformer layers of the render's Wan2.1-1.3B-shaped model")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("benchmarks/host_syncs.py needs a CUDA GPU (the sync debug mode is CUDA's)")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    if "attend" in parts:
        result["attend"] = audit_attend(device)
    if "render" in parts:
        result["render"] = audit_render(device, args.work or Path(tempfile.mkdtemp(prefix="syncs_")),
                                        args.layers, args.steps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
