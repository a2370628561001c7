"""Entry point. `python launch.py` starts the storyboard app; with --story it renders headless.

Headless:  python launch.py --story examples/default_story.json --out outputs/demo [--regenerate N]
           writes DIR/shot_XX.mp4 (XX = 0-based shot index), DIR/story.mp4, DIR/routing.json,
           DIR/summary.json and prints one line per shot.
App:       python launch.py [--host 127.0.0.1] [--port 7860] [--share] [--model PATH]
Routing:   python launch.py --routing-demo   (which earlier frames each frame recalls; no model)
argparse lives here and only here; everything else takes explicit arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MoC Storyboard: multi-shot video generation with Mixture-of-Contexts attention")
    p.add_argument("--story", type=Path, help="render this story JSON headless (no UI)")
    p.add_argument("--out", type=Path, help="output folder for --story (default: outputs/<story name>)")
    p.add_argument("--regenerate", type=int, metavar="N", help="regenerate shot N only (0-based); other shots come from the cache")
    p.add_argument("--model", type=Path, help="local model folder (default: the shipped model in assets/default_model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--cache-dir", type=Path, help="shot cache folder (default: ./cache)")
    p.add_argument("--host", default="127.0.0.1", help="app: interface to listen on")
    p.add_argument("--port", type=int, default=7860, help="app: port")
    p.add_argument("--share", action="store_true", help="app: ask Gradio for a public share link")
    p.add_argument("--routing-demo", action="store_true",
                   help="print MoC routing on a random multi-shot layout (no model) and exit")
    return p.parse_args(argv)


def render_headless(args) -> int:
    from engine.engine import StoryEngine
    from engine.events import Progress, RenderStopped, ShotDone
    from engine.model import ModelError
    from engine.story import Story, StoryError

    try:
        story = Story.load(args.story)
    except StoryError as err:
        print(f"error: {args.story}: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("outputs") / args.story.stem
    try:
        engine = StoryEngine.load(args.model, device=args.device, cache_dir=args.cache_dir)
    except (ModelError, OSError) as err:
        print(f"error: cannot load the model: {err}", file=sys.stderr)
        return 2
    if not engine.model.trained:
        print(f"note: the model ({engine.model_name}) is untrained: expect colour noise, not a story")

    def on_event(event) -> None:
        if isinstance(event, Progress) and event.step and event.step in (1, event.total):
            print(f"  {event.message}", flush=True)
        elif isinstance(event, ShotDone):
            r = event.result
            print(f"shot {r.index:02d}: {r.status:9s} {r.seconds:7.2f} s  density {r.density:.3f}  "
                  f"seed {r.seed}  {r.video_path}", flush=True)

    try:
        result = engine.render(story, regenerate=args.regenerate, out_dir=out, on_event=on_event)
    except StoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RenderStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 130
    s = result.summary
    print(f"story: {result.story_video}  ({s['seconds']:.1f} s, sparsity {s['sparsity']:.3f}, "
          f"cache {json.dumps(s['cache'])})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model loads from local folders
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.routing_demo:
        from engine.moc.demo import routing_demo
        print(routing_demo())
        return 0
    if args.story is not None:
        return render_headless(args)
    if args.regenerate is not None or args.out is not None:
        print("error: --out and --regenerate need --story", file=sys.stderr)
        return 2
    from app.server import serve
    serve(model=args.model, host=args.host, port=args.port, cache_dir=args.cache_dir, device=args.device,
          share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
