"""Entry point. `python launch.py` starts the storyboard app; with --story it renders headless.

Headless:  python launch.py --story examples/default_story.json --out outputs/demo [--regenerate N]
           writes DIR/shot_XX.mp4 (XX = 0-based shot index), DIR/story.mp4, DIR/routing.json,
           DIR/summary.json and prints one line per shot.
App:       python launch.py [--host 127.0.0.1] [--port 7860] [--share] [--model PATH] [--auth USER:PASS | FILE]
Several:   torchrun --nproc-per-node N launch.py --story FILE --out DIR   (sequence parallel: each
           forward spread over N processes, NCCL on GPUs (one each), gloo on the CPU; rank 0 writes,
           the others write nothing)
           torchrun --nproc-per-node N launch.py [--model PATH] [--host ...]   (the app: rank 0 serves
           it, ranks 1..N-1 render each of its jobs in step, engine/ranks.py)
Routing:   python launch.py --routing-demo   (which earlier frames each frame recalls; no model)
argparse lives here and only here; everything else takes explicit arguments.
Every failure ends in one line on stderr and a non-zero exit (2: bad input, 1: anything else,
130: stopped); STORYBOARD_DEBUG=1 shows the traceback too.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class UsageError(Exception):
    """A flag's value is unusable; the message names the flag and what it accepts."""


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 65535], got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {port}")
    return port


def _shot_index(text: str) -> int:
    try:
        index = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a 0-based shot index (an integer >= 0), got {text!r}") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"must be a 0-based shot index (>= 0), got {index}")
    return index


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """--auth USER:PASS, or a file whose first line is USER:PASS (keeps the password out of `ps`)."""
    if value is None:
        return None
    text = value
    if ":" not in value or Path(value).is_file():
        try:
            text = Path(value).read_text(encoding="utf-8").splitlines()[0].strip() if Path(value).is_file() else value
        except (OSError, UnicodeDecodeError, IndexError) as err:
            raise UsageError(f"--auth: cannot read {value!r}: {err}") from None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UsageError("--auth: give USER:PASS or a file whose first line is USER:PASS (both non-empty)")
    return user, password


def _open_top_k(value: str) -> int:
    try:
        k = int(value)
    except ValueError:
        k = -1
    if not 0 <= k <= 64:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number of chunks from 0 to 64")
    return k


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="MoC Storyboard: multi-shot video generation with Mixture-of-Contexts attention")
    p.add_argument("--story", type=Path, help="render this story JSON headless (no UI)")
    p.add_argument("--out", type=Path, help="output folder for --story (default: outputs/<story name>)")
    p.add_argument("--regenerate", type=_shot_index, metavar="N", help="regenerate shot N only (0-based); other shots come from the cache")
    p.add_argument("--one-sided", action="store_true",
                   help="with --regenerate: only earlier shots are context (default: the later shots too, "
                        "which then keep their takes and are not stale)")
    p.add_argument("--open-top-k", type=_open_top_k, default=2, metavar="K",
                   help="both-sided regeneration: the regenerated shot keeps its top-k over the earlier "
                        "shots and routes K more chunks among the later ones (default 2; 0: the later "
                        "chunks compete with the earlier ones in the one top-k)")
    p.add_argument("--no-keep-context", action="store_true",
                   help="give the context K/V cache's memory back after every render (default: keep it, so "
                        "that another take of a shot skips reading the unchanged other shots again)")
    p.add_argument("--model", type=Path, help="local model folder (default: the shipped model in assets/default_model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--cache-dir", type=Path, help="shot cache folder (default: ./cache)")
    p.add_argument("--host", default="127.0.0.1", help="app: interface to listen on")
    p.add_argument("--port", type=_port, default=7860, help="app: port")
    p.add_argument("--share", action="store_true", help="app: ask Gradio for a public share link")
    p.add_argument("--auth", metavar="USER:PASS|FILE",
                   help="app: require this login (or the USER:PASS on the first line of FILE); "
                        "use it whenever --host is not loopback")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's blocks around the attention (norms, modulation, "
                        "feed-forward fused; speed only, the first render compiles: minutes on a CPU)")
    p.add_argument("--routing-demo", action="store_true",
                   help="print MoC routing on a random multi-shot layout (no model) and exit")
    return p.parse_args(argv)


def render_headless(args) -> int:
    from engine.story import Story, StoryError

    try:
        story = Story.load(args.story)
    except StoryError as err:
        print(f"error: {args.story}: {err}", file=sys.stderr)
        return 2
    if args.regenerate is not None and args.regenerate >= len(story.shots):
        print(f"error: --regenerate must be a shot index in [0, {len(story.shots) - 1}] for {args.story}, "
              f"got {args.regenerate}", file=sys.stderr)
        return 2
    out = args.out or Path("outputs") / args.story.stem
    if not under_torchrun():
        return render_with(args, story, out, None, args.device)
    from engine.parallel import start
    import torch.distributed as dist
    try:
        parallel, device = start(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:  # the ranks other than 0 render in step, quietly, and write nothing (StoryEngine.writes)
        code = render_with(args, story, out, parallel, device, quiet=parallel.rank != 0)
        # Rank 0 is still writing videos when the others return: meet before the teardown, so that no
        # rank tears its group down while a peer has already gone (gloo aborted such a rank 0 in CI).
        dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


def under_torchrun() -> bool:
    """Started by torchrun with more than one process (its WORLD_SIZE variable)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def load_engine(args, parallel, device: str, preview: bool):
    """The StoryEngine of --model / --cache-dir, or None after printing why it cannot load."""
    from engine.engine import StoryEngine
    from engine.model import ModelError
    from engine.sampler import SamplerOptions

    try:
        engine = StoryEngine.load(args.model, device=device, cache_dir=args.cache_dir, parallel=parallel,
                                  options=SamplerOptions(preview=preview, open_top_k=args.open_top_k,
                                                         keep_context=not args.no_keep_context))
        if args.compile:
            engine.model.transformer.compile_blocks()
        return engine
    except (ModelError, OSError) as err:
        print(f"error: cannot load the model: {err}", file=sys.stderr)
    except ValueError as err:  # the heads do not divide over the processes
        print(f"error: {err}", file=sys.stderr)
    return None


def render_with(args, story, out: Path, parallel, device: str, quiet: bool = False) -> int:
    """Render `story` into `out` (with `parallel`: as one rank of a sequence-parallel group)."""
    from engine.events import Progress, RenderStopped, ShotDone
    from engine.story import StoryError

    say = (lambda *a, **k: None) if quiet else print
    engine = load_engine(args, parallel, device, preview=not quiet)
    if engine is None:
        return 2
    if not engine.model.trained:
        say(f"note: the model ({engine.model_name}) is untrained: expect colour noise, not a story")
    elif engine.model.caveat:
        say(f"note: {engine.model.caveat}")
    if parallel is not None:
        say(f"sequence parallel: {parallel.world} processes, {engine.model.transformer.num_heads // parallel.world} "
            f"heads each, on {device}")

    def on_event(event) -> None:
        if quiet:
            return
        if isinstance(event, Progress) and (event.context is not None or event.step in (1, event.total)):
            print(f"  {event.message}", flush=True)
        elif isinstance(event, ShotDone):
            r = event.result
            print(f"shot {r.index:02d}: {r.status:9s} {r.seconds:7.2f} s  density {r.density:.3f}  "
                  f"seed {r.seed}  {r.video_path}", flush=True)

    try:
        result = engine.render(story, regenerate=args.regenerate, out_dir=out, on_event=on_event,
                               both_sides=False if args.one_sided else None)
    except StoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RenderStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 130
    s = result.summary
    if args.regenerate is not None:
        context = "the shots before and after it" if s.get("both_sides") else "the shots before it"
        note = f" (later shots not used: {s['both_sides_note']})" if s.get("both_sides_note") else ""
        say(f"regenerated shot {args.regenerate} with {context} as context{note}")
    for index in s.get("takes_gone", []):
        say(f"note: shot {index:02d}'s remembered take ({story.shots[index].take}) is no longer in the shot cache; "
              "it was generated anew")
    say(f"story: {result.story_video}  ({s['seconds']:.1f} s, sparsity {s['sparsity']:.3f}, "
          f"cache {json.dumps(s['cache'])})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the one place that turns any failure into one line
        if os.environ.get("STORYBOARD_DEBUG"):
            raise
        from engine.engine import ResourceError
        from engine.model import ModelError
        from engine.story import StoryError
        kind = "" if isinstance(err, (StoryError, ModelError, OSError, ResourceError)) else f"{type(err).__name__}: "
        print(f"error: {kind}{str(err).splitlines()[0] if str(err) else ''}"[:500]
              + ("" if kind == "" else "  (STORYBOARD_DEBUG=1 shows the traceback)"), file=sys.stderr)
        return 2 if isinstance(err, (StoryError, ModelError)) else 1


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model loads from local folders
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.routing_demo:
        from engine.moc.demo import routing_demo
        print(routing_demo())
        return 0
    if args.story is not None:
        return render_headless(args)
    if args.regenerate is not None or args.out is not None or args.one_sided:
        print("error: --out, --regenerate and --one-sided need --story", file=sys.stderr)
        return 2
    auth = parse_auth(args.auth)
    if under_torchrun():
        return serve_across(args, auth)
    warn_if_public(args, auth)
    from app.server import serve
    serve(model=args.model, host=args.host, port=args.port, cache_dir=args.cache_dir, device=args.device,
          share=args.share, auth=auth)
    return 0


def warn_if_public(args, auth) -> None:
    if not is_loopback(args.host) or args.share:
        where = "a public share link" if args.share else f"{args.host}"
        print(f"warning: serving on {where}: anyone who can reach it can use the app, its GPU and its cache"
              + ("" if auth else "; the app has no login unless --auth USER:PASS is given"), file=sys.stderr)


def serve_across(args, auth) -> int:
    """The app under torchrun: rank 0 serves it; every other rank renders each of its jobs in step
    (engine/ranks.py: `follow`) until the app closes and rank 0 sends the quit job."""
    from engine.parallel import start
    from engine.ranks import Jobs, Leader, follow, leave
    try:
        parallel, device = start(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    jobs = None
    try:
        engine = load_engine(args, parallel, device, preview=parallel.rank == 0)
        if engine is None:
            return 2
        jobs = Jobs.open(parallel)
        if parallel.rank != 0:
            follow(engine, jobs)
            return 0
        print(f"sequence parallel: {parallel.world} processes, {engine.model.transformer.num_heads // parallel.world} "
              f"heads each, on {device}; rank 0 serves the app", flush=True)
        warn_if_public(args, auth)
        from app.server import serve
        leader = Leader(engine, jobs)
        try:
            serve(host=args.host, port=args.port, share=args.share, auth=auth, engine=engine, renderer=leader)
        finally:
            leader.close()  # the other ranks' follow returns
        return 0
    finally:
        leave(jobs)  # out of step (only after a served job: jobs exist), this ends the process here


if __name__ == "__main__":
    sys.exit(main())
